"""Shared fixtures: tiny RetNet configs and models, built locally (nothing is downloaded)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import retnet_hf
from retnet_hf import CACHE_NAME, RetNetConfig, RetNetForCausalLM


def tiny_config(**overrides) -> RetNetConfig:
    """A RetNet small enough for a test: d 32, dv 48, 2 layers, 2 heads (key head dim 16), vocab 64."""
    fields = dict(
        vocab_size=64,
        decoder_embed_dim=32,
        decoder_value_embed_dim=48,
        decoder_ffn_embed_dim=64,
        decoder_layers=2,
        decoder_retention_heads=2,
        recurrent_chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def random_ids(batch=2, length=11, seed=0, vocab=64, low=3) -> torch.Tensor:
    """Token ids `[batch, length]` in `[low, vocab)` from a seeded generator; `low=3` keeps clear of the special ids
    0 (pad), 1 (bos) and 2 (eos)."""
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_difference(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |x - reference| / max |reference|."""
    return ((x - reference).abs().max() / reference.abs().max()).item()


def tiny_model(dtype=torch.float32, seed=0, **overrides) -> RetNetForCausalLM:
    torch.manual_seed(seed)
    return RetNetForCausalLM(tiny_config(**overrides)).to(dtype).eval()


def cache_of(outputs):
    """The cache a model output carries, in the running transformers' field (`cache` from 5.24, before it
    `past_key_values`), read without the deprecation notice that the other name logs."""
    return getattr(outputs, CACHE_NAME)


@torch.no_grad()
def logits_token_by_token(model, ids, cache=None):
    """Feed `ids` [B, T] one token per call through the recurrent cache; the logits of every step, [B, T, V]."""
    steps = []
    for t in range(ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = cache_of(out)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """A test leaves torch's thread count as it found it (the commands that run ONNX Runtime set it to 1)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def model64():
    return tiny_model(torch.float64)


def import_torchscale():
    """torchscale 0.3.0's `(RetNetConfig, RetNetDecoder)` through `benchmarks.common.import_torchscale` (a
    stand-in for timm's `drop_path` during the import); skips the calling test module when it is not installed."""
    import importlib.util

    if importlib.util.find_spec("torchscale") is None or importlib.util.find_spec("fairscale") is None:
        pytest.skip(
            "torchscale is not installed (pip install --no-deps torchscale==0.3.0 fairscale==0.4.0)",
            allow_module_level=True,
        )
    from benchmarks.common import import_torchscale as benchmarks_import

    return benchmarks_import()


# ----------------------------------------------------------------------------------------------- saved folders

CODE_FILES = ("modeling_retnet.py", "configuration_retnet.py", "retention.py", "fla_retention.py")


def assert_same_state_dict(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_saved_folder(folder: Path):
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files), files
    for name in CODE_FILES:
        assert name in files, f"{name} was not copied next to the weights: {sorted(files)}"


# ------------------------------------------------------------------------ child processes without the package

REPO_ROOT = Path(retnet_hf.__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the benchmarks (not installed) are tested too: `import benchmarks.decode`
    sys.path.insert(0, str(REPO_ROOT))

# `retnet-hf train` at test size: the tiny preset, a 300-token tokenizer, 4 blocks of 64 tokens per step
TINY_TRAIN = ["--preset", "tiny", "--vocab-size", "300", "--block-size", "64", "--batch-size", "4"]
# a python with transformers 4.48 (AutoTrain's pin), for the saved code's checks; CI makes that venv
TRANSFORMERS_448_ENV = "RETNET_TRANSFORMERS_448_PYTHON"
# a python with transformers 5.24, the last release whose recurrent cache layers cannot roll back: the saved code's
# stand-in layer and its refusal of assisted generation run there (CI makes that venv too)
TRANSFORMERS_524_ENV = "RETNET_TRANSFORMERS_524_PYTHON"


def subprocess_env(tmp_path: Path) -> dict:
    """An environment for a child python that cannot see this repository: offline, own HF cache, no PYTHONPATH to
    the repo (the editable install is blocked inside the scripts with `sys.modules['retnet_hf'] = None`)."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    env["RETNET_TEST_REPO_ROOT"] = str(REPO_ROOT)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [p for p in paths if Path(p).resolve() != REPO_ROOT and not Path(p).resolve().is_relative_to(REPO_ROOT)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        env.pop("PYTHONPATH", None)
    return env


def run_script(python: str, script: str, tmp_path: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    path = tmp_path / "child_script.py"
    path.write_text(textwrap.dedent(script))
    result = subprocess.run(
        [python, str(path)],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"child failed ({python}):\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


# A child script starts with this: the package must not be importable (it is installed in editable mode, so the
# path alone would not hide it).
BLOCK_PACKAGE = """
import os
import sys
from pathlib import Path

repo = Path(os.environ["RETNET_TEST_REPO_ROOT"])
assert not any(Path(p or ".").resolve() == repo for p in sys.path), sys.path
sys.modules["retnet_hf"] = None
try:
    import retnet_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("retnet_hf is importable in the child process; the trust_remote_code test would prove nothing")
"""


# -------------------------------------------------------- flash-linear-attention's kernels through the interpreter

TESTS_DIR = Path(__file__).resolve().parent


def run_interpreted(cases: Path, tmp_path: Path, timeout: int = 600) -> str:
    """Run the pytest file `cases` in a child python with flash-linear-attention's Triton kernels interpreted on the
    CPU (the plugin tests/fla_interpreter.py, loaded before triton is imported); fail with the child's output
    unless every case there passed (a skip counts as a failure: CI installs fla and triton). Skips when fla or
    triton is not installed. Returns the child's output."""
    import importlib.util

    missing = [name for name in ("fla", "triton") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (pip install --no-deps flash-linear-attention==0.6.0 "
            "fla-core==0.6.0 triton==3.9.0 einops)"
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)]), HF_HOME=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the plugin sets it, and refuses a triton imported before it
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "fla_interpreter"]
    result = subprocess.run(
        [*command, "--rootdir", str(TESTS_DIR), "--basetemp", str(tmp_path / "basetemp"), str(cases)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert result.returncode == 0 and " passed" in summary and "skipped" not in summary, output
    return output
