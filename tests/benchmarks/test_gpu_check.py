"""scripts/gpu_check.sh, the one-shot run on a GPU machine, through its dry run on this CPU; and the parts of its
python steps that only a GPU runs in full: the fla-vs-torch comparisons (here torch against torch), the training
benchmark's optional variants (rows that say why they did not run), the decode benchmark's compiled path."""

import copy
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from benchmarks import common, gpu_check, prefill
from retnet_hf.model import RetNetForCausalLM

from conftest import REPO_ROOT


SCRIPT = REPO_ROOT / "scripts" / "gpu_check.sh"
STEPS = ("install", "checks", "train", "decode", "vllm")


def run_script(tmp_path, *args, **env):
    """The script with `OUT` under `tmp_path`, this python and a venv folder there; returns (process, OUT)."""
    out = tmp_path / "out"
    environment = dict(
        os.environ, OUT=str(out), GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_VENV=str(tmp_path / "venv"), **env
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    return result, out


def step_statuses(summary: str) -> dict:
    """{step: status} from the steps' table of summary.md (its first)."""
    lines = summary.splitlines()
    start = lines.index("| step | status | seconds | limit s | log |") + 2
    statuses = {}
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        name, status = [cell.strip() for cell in line.strip("|").split("|")][:2]
        statuses[name] = status
    return statuses


def test_the_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    result, out = run_script(tmp_path_factory.mktemp("gpu_check"), "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_dry_run_passes_every_step_and_writes_each_result(dry_run):
    summary = (dry_run / "summary.md").read_text()
    assert step_statuses(summary) == {step: "ok" for step in STEPS}, summary
    expected = [f"{step}.log" for step in STEPS] + [
        "env.md",
        "env.json",
        "checks/gpu_check.md",
        "checks/gpu_check.json",
    ]
    expected += [f"train/prefill.{suffix}" for suffix in ("md", "json", "png")]
    expected += [f"decode/decode.{suffix}" for suffix in ("md", "json", "png")]
    missing = [name for name in expected if not (dry_run / name).is_file()]
    assert not missing, missing
    # the results are repeated in the summary (a device run may bring back only it)
    for part in ("env.md", "checks/gpu_check.md", "train/prefill.md", "decode/decode.md"):
        assert f"## {part}" in summary
    vllm = (dry_run / "vllm.log").read_text()
    assert "the plugin supports 0.32.x only (SUPPORTED_VLLM)" in vllm
    assert "tests/vllm_plugin/test_vllm.py: " in vllm


def test_dry_run_results_say_what_ran_on_the_cpu(dry_run):
    checks = json.loads((dry_run / "checks" / "gpu_check.json").read_text())
    assert {row["status"] for row in checks} == {"ok", "skipped"}
    assert [row["note"] for row in checks if row["status"] == "skipped"] == [
        "the model is on cpu, and fla's Triton kernels need a CUDA device"
    ]
    train = json.loads((dry_run / "train" / "prefill.json").read_text())
    by_variant = {row["variant"]: row for row in train}
    assert set(by_variant) == {"RetNet chunkwise", "Llama SDPA", *prefill.OPTIONAL_VARIANTS}
    assert all(row["mode"] == "forward+backward" for row in train)
    for variant in ("RetNet chunkwise", "Llama SDPA"):
        assert by_variant[variant]["skipped"] is None and by_variant[variant]["tokens/s"] > 0
    for variant in prefill.OPTIONAL_VARIANTS:  # each says why it did not run here
        assert "CUDA" in by_variant[variant]["skipped"], by_variant[variant]
    decode = json.loads((dry_run / "decode" / "decode.json").read_text())
    compiled = {row["model"]: row["compiled"] for row in decode if row["path"] == "compiled"}
    # RetNet asks generate() to compile its steps on any device; transformers compiles Llama's only on a GPU
    assert compiled == {"RetNet": "yes", "Llama": "no: generate() ran eager"}
    assert {row["path"] for row in decode if row["tokens/s"] > 0} == {"step", "generate", "compiled"}


def test_pack_and_the_deadline(tmp_path):
    """--pack leaves summary.md and one tarball in OUT and nothing in the temporary folder; a step with no time left
    is skipped, and says so."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result, out = run_script(tmp_path, "--dry-run", "--pack", GPU_CHECK_DEADLINE="0", TMPDIR=str(scratch))
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.tar.gz", "summary.md"]
    assert list(scratch.iterdir()) == []
    summary = (out / "summary.md").read_text()
    assert step_statuses(summary) == {step: "skipped: no time left" for step in STEPS}
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        assert "gpu_check/summary.md" in archive.getnames()


def test_backend_comparisons_run_and_agree_with_themselves():
    """The fla-vs-torch rows, run here as torch against torch: every check agrees exactly."""
    torch.manual_seed(0)
    config = common.size_config("tiny")
    model = RetNetForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    rows = gpu_check.run_checks(model, ids, prefix=32, prompt=20, new_tokens=6, backends=("torch", "torch"))
    names = [row["check"] for row in rows]
    for check in ("logits", "logits (rms error ratio)", "generate() greedy tokens", "gradients (worst parameter)"):
        assert f"torch vs torch: {check}" in names
    assert all(row["status"] == "ok" for row in rows), rows
    assert all(row["value"] == 0 for row in rows if row["check"].startswith("torch vs torch")), rows


def test_optional_training_variants_that_cannot_run_say_why_and_the_others_go_on():
    retnet, llama = common.build_models(common.size_config("tiny"))
    broken = copy.deepcopy(llama)
    broken.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("no kernel here")))
    others = {prefill.LLAMA_FLASH_ATTENTION_2: "flash-attn is not installed", prefill.FLA_RETNET: broken}
    rows = prefill.prefill_benchmark(
        retnet, llama, [32], modes=["forward+backward"], variants=prefill.ALL_VARIANTS, rounds=1, others=others
    )
    by_variant = {row["variant"]: row for row in rows}
    assert list(by_variant) == list(prefill.ALL_VARIANTS)
    assert by_variant[prefill.FLA_CHUNKWISE]["skipped"].endswith("fla's Triton kernels need a CUDA device")
    assert by_variant[prefill.LLAMA_FLASH_ATTENTION_2]["skipped"] == "flash-attn is not installed"
    assert by_variant[prefill.FLA_RETNET]["skipped"] == "failed: RuntimeError: no kernel here"
    for variant in prefill.PREFILL_VARIANTS:
        assert by_variant[variant]["skipped"] is None and by_variant[variant]["seconds"] > 0
    # every variant's time against Llama SDPA's, but Llama SDPA's own
    assert by_variant["RetNet parallel"]["x Llama time"] > 0 and by_variant["Llama SDPA"]["x Llama time"] is None
    assert retnet.config.retention_backend == "auto"  # the variants' backends are set per call and restored
