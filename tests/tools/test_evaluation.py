"""`retnet-hf eval` and the local lm-eval tasks, through lm-eval's own HFLM, on a tiny RetNet that `retnet-hf train`
wrote: batch sizes agree, right padding (lm-eval's loglikelihood rows, no attention mask) changes no score, a RetNet
gets whole requests, and the command runs end to end offline."""

import json
import math

import pytest
import torch

from retnet_hf.cli import main
from retnet_hf.evaluation import (
    GENERATE,
    LOCAL_TAG,
    LOCAL_TASKS,
    NEXT_LINE,
    PERPLEXITY,
    UNBOUNDED_CONTEXT,
    context_length,
    lm_eval_model,
    sample_responses,
    task_manager,
    write_local_tasks,
)
from retnet_hf.loading import load_causal_lm, load_tokenizer
from retnet_hf.sample_data import SHAKESPEARE_HELD_OUT, SHAKESPEARE_TRAIN


lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'retnet-hf[eval]')")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RetNet trained for 12 steps on the first 60,000 characters by `retnet-hf train`."""
    root = tmp_path_factory.mktemp("eval_run")
    text = root / "shakespeare.txt"
    text.write_text(SHAKESPEARE_TRAIN.read_text()[:60_000])
    out = root / "model"
    settings = "--preset tiny --vocab-size 300 --block-size 64 --batch-size 4 --max-steps 12 --eval-steps 6"
    assert (
        main(["train", str(text), "--output", str(out), *settings.split(), "--save-steps", "12", "--lr", "3e-3"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("tasks"))  # from the package's sample data


def documents(tasks, name):
    return [json.loads(line) for line in (tasks / f"{name}.jsonl").read_text().splitlines()]


def request(context, continuation, kind="loglikelihood"):
    arguments = (context, continuation) if kind == "loglikelihood" else (context,)
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


class ForwardCalls:
    """Records each forward of a model: its input ids and attention mask (None when none was passed)."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append((ids.clone(), kwargs.get("attention_mask")))

    def remove(self):
        self.handle.remove()


def test_local_tasks_are_held_out_shakespeare_and_guanaco_prompts(tasks):
    seen, held_out = SHAKESPEARE_TRAIN.read_text(), SHAKESPEARE_HELD_OUT.read_text()
    questions = documents(tasks, NEXT_LINE)
    assert len(questions) == 200 and len({q["label"] for q in questions}) == 4
    for question in questions:
        assert len(question["choices"]) == len(set(question["choices"])) == 4
        speaker, *lines = question["context"].split("\n")
        passage = "\n".join(lines + [question["choices"][question["label"]]])
        assert speaker.endswith(":") and 1 <= len(lines) <= 4
        assert passage in held_out and passage not in seen  # the true line is the one that follows
    passages = documents(tasks, PERPLEXITY)
    assert len(passages) == 40
    assert all(len(p["text"]) >= 2000 and p["text"] in held_out for p in passages)
    prompts = documents(tasks, GENERATE)
    assert len(prompts) == 50
    assert all(p["prompt"].startswith("### Human: ") and p["prompt"].endswith("### Assistant:") for p in prompts)
    manager = task_manager([LOCAL_TAG], [tasks])
    assert set(LOCAL_TASKS) <= set(manager.all_tasks)


def test_the_context_length_a_retnet_gets(trained):
    from transformers import LlamaConfig

    model, tokenizer = load_causal_lm(str(trained)), load_tokenizer(str(trained))
    assert context_length(model.config) == UNBOUNDED_CONTEXT
    assert context_length(model.config, 64) == 64
    assert context_length(LlamaConfig(max_position_embeddings=128)) is None  # lm-eval reads it from the config
    # lm-eval's own reading falls back to the tokenizer's model_max_length, else to 2048: a borrowed tokenizer
    # without one would cut a RetNet's requests at 2048 tokens; the command's HFLM does not
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    tokenizer.model_max_length = VERY_LARGE_INTEGER
    assert HFLM(pretrained=model, backend="causal", tokenizer=tokenizer).max_length == 2048
    assert lm_eval_model(model, tokenizer).max_length == UNBOUNDED_CONTEXT


def local_task_responses(model, tokenizer, manager, batch_size: int, limit: int) -> dict:
    """Each local task's per-document responses from lm-eval's own HFLM around `model` (12 generated tokens at most)."""
    results = lm_eval.simple_evaluate(
        model=lm_eval_model(model, tokenizer, batch_size=batch_size),
        tasks=[LOCAL_TAG],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        gen_kwargs={"max_gen_toks": 12},
    )
    return sample_responses(results)


def scores(doc) -> list:
    """A document's loglikelihoods (the first field of each (score, is_greedy) response)."""
    return [r[0] if isinstance(r, (list, tuple)) else r for r in doc]


def test_batch_sizes_1_and_4_agree(trained, tasks):
    """The three local tasks through lm-eval's own HFLM: loglikelihoods to 1e-5, the same generations; the batch-4
    run did send right-padded rows without a mask, and left-padded prompts with one."""
    model, tokenizer = load_causal_lm(str(trained)).eval(), load_tokenizer(str(trained))
    manager = task_manager([LOCAL_TAG], [tasks])
    responses, calls = {}, {}
    for batch_size in (1, 4):
        recorder = ForwardCalls(model)
        responses[batch_size] = local_task_responses(model, tokenizer, manager, batch_size, limit=6)
        recorder.remove()
        calls[batch_size] = recorder.calls
    assert set(responses[1]) == set(LOCAL_TASKS)
    for name in (NEXT_LINE, PERPLEXITY):
        one, four = responses[1][name], responses[4][name]
        assert len(one) == len(four) == 6
        for doc_one, doc_four in zip(one, four):
            scores_one, scores_four = scores(doc_one), scores(doc_four)
            assert scores_four == pytest.approx(scores_one, rel=1e-5, abs=1e-5), name
            assert all(math.isfinite(s) and s < 0 for s in scores_one)
        if name == NEXT_LINE:  # and the same greedy flags
            assert [[r[1] for r in doc] for doc in one] == [[r[1] for r in doc] for doc in four]
    generations = responses[1][GENERATE]
    assert generations == responses[4][GENERATE]
    assert any(text[0].strip() for text in generations)
    pad = tokenizer.pad_token_id
    right_padded = [ids for ids, mask in calls[4] if mask is None and ids.shape[0] > 1 and (ids[:, -1] == pad).any()]
    assert right_padded, "lm-eval sent no batched, right-padded loglikelihood rows"
    left_padded = [mask for _, mask in calls[4] if mask is not None and mask.shape[0] > 1 and (mask[:, 0] == 0).any()]
    assert left_padded, "lm-eval sent no batched, left-padded prompts with a mask"
    assert len(calls[1]) > len(calls[4])  # batch 4 did batch


@pytest.mark.parametrize("chunk_size", [None, 16], ids=["saved chunk size", "chunkwise over the padding"])
def test_right_padding_does_not_change_a_requests_score(trained, tasks, chunk_size):
    """A short request scored alone, then batched with longer ones: lm-eval pads it on the right (with no
    attention mask) to the longest row, across several chunks with chunk size 16; its score stays."""
    overrides = {} if chunk_size is None else {"recurrent_chunk_size": chunk_size}
    model, tokenizer = load_causal_lm(str(trained), **overrides).eval(), load_tokenizer(str(trained))
    passages = [p["text"] for p in documents(tasks, PERPLEXITY)]
    short = ("ROMEO:\nBut soft, what light", " through yonder window breaks?")
    longer = [(p[: 300 + 150 * i], p[300 + 150 * i : 360 + 150 * i]) for i, p in enumerate(passages[:3])]
    alone = lm_eval_model(model, tokenizer, batch_size=1).loglikelihood([request(*short)])
    recorder = ForwardCalls(model)
    together = lm_eval_model(model, tokenizer, batch_size=4).loglikelihood([request(*r) for r in [short, *longer]])
    recorder.remove()
    ((ids, mask),) = recorder.calls  # one forward for the four
    short_length = len(tokenizer(short[0] + short[1]).input_ids) - 1  # the last token is not fed
    assert mask is None and ids.shape[0] == 4
    padding = ids.shape[1] - short_length
    assert padding > 3 * 16 and (ids == tokenizer.pad_token_id).sum(dim=1).max() >= padding
    assert together[0][0] == pytest.approx(alone[0][0], rel=1e-5, abs=1e-5)
    assert together[0][1] == alone[0][1]


def test_a_long_document_is_scored_in_one_window(trained, tasks):
    """Rolling perplexity of a RetNet over a document longer than lm-eval's default 2048 tokens: one window, the
    same as one forward over the whole document."""
    model, tokenizer = load_causal_lm(str(trained)).eval(), load_tokenizer(str(trained))
    text = "\n\n".join(p["text"] for p in documents(tasks, PERPLEXITY)[:4])
    ids = [tokenizer.bos_token_id] + tokenizer(text).input_ids
    assert len(ids) > 2048
    (rolling,) = lm_eval_model(model, tokenizer).loglikelihood_rolling([request(text, None, "loglikelihood_rolling")])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    direct = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert rolling == pytest.approx(direct, rel=1e-5)


def test_eval_command_on_a_trained_folder(trained, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["eval", str(trained), "--limit", "3", "--batch-size", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["results"]) >= set(LOCAL_TASKS)
    assert 0 <= results["results"][NEXT_LINE]["acc,none"] <= 1
    assert 1 < results["results"][PERPLEXITY]["byte_perplexity,none"] < 300  # a byte-level model: at most vocab
    assert results["results"][GENERATE]["chrf,none"] >= 0
    assert results["retnet_hf"]["max_length"] == UNBOUNDED_CONTEXT and results["config"]["limit"] == 3
    assert all(name in printed for name in LOCAL_TASKS) and str(out) in printed


def test_eval_command_runs_a_task_folder_of_ones_own(trained, tmp_path, capsys):
    """The README's recipe: a JSON-lines file and a task YAML in a folder, passed as --tasks-dir."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    rows = [
        {"question": "ROMEO:\nBut soft, what light", "choices": ["through yonder window", "xq zzv qqq"], "label": 0}
    ]
    (folder / "my_lines.jsonl").write_text("\n".join(json.dumps(row) for row in rows * 2) + "\n")
    (folder / "my_lines.yaml").write_text(
        "task: my_lines\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'my_lines.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "mine.json"
    code = main(["eval", str(trained), "--tasks", "my_lines", "--tasks-dir", str(folder), "--output", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["results"]) == ["my_lines"] and results["n-samples"]["my_lines"]["effective"] == 2
    assert "my_lines" in capsys.readouterr().out


def test_eval_command_refuses_clearly(trained, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["eval", str(trained), "--data-dir", str(tmp_path)]) == 2
    assert "tinyshakespeare-heldout.txt: no such file" in capsys.readouterr().err
    assert main(["eval", str(trained), "--tasks-dir", str(tmp_path / "missing")]) == 2
    assert "no such task folder" in capsys.readouterr().err


def test_eval_runs_from_an_installed_wheel_with_no_data_arguments(trained, tmp_path):
    """A non-editable install carries the local tasks' data: the package is built as a wheel, installed into a
    folder of its own, and `retnet-hf eval` runs from there in a process that cannot see this repository."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, subprocess_env

    dist, site = tmp_path / "dist", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO_ROOT)]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("retnet_hf-*.whl")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = str(site)  # first on the path: the wheel's retnet_hf, not the editable checkout
    script = (
        "import sys, retnet_hf\n"
        f"assert retnet_hf.__file__.startswith({str(site)!r}), retnet_hf.__file__\n"
        "from retnet_hf.cli import main\n"
        f"sys.exit(main(['eval', {str(trained)!r}, '--limit', '2', '--output', 'results.json']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(LOCAL_TASKS) <= set(results["results"])


# ------------------------------------------------------------------ nothing lost: where the results go, and when


@pytest.fixture
def no_evaluation(monkeypatch):
    """lm-eval's simple_evaluate fails the test if called: the checks must come before any evaluation."""

    def evaluate(*args, **kwargs):
        raise AssertionError("simple_evaluate ran before the output was checked")

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)


@pytest.mark.parametrize("name", ["model.safetensors", "README.md", "config.json", "tokenizer.json", "notes.json"])
def test_eval_never_writes_a_file_of_the_model_folder_but_its_own(trained, capsys, no_evaluation, name):
    target = trained / name
    before = target.read_bytes() if target.exists() else None
    assert main(["eval", str(trained), "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert "a file of the model folder" in err and "Traceback" not in err
    assert (target.read_bytes() if target.exists() else None) == before


def test_eval_refuses_an_existing_file_that_is_not_an_earlier_result(trained, tmp_path, capsys, no_evaluation):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    assert main(["eval", str(trained), "--output", str(mine)]) == 2
    assert "not an earlier result of retnet-hf eval" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}'


@pytest.mark.parametrize("where", ["a folder", "through a file", "read-only folder", "read-only file"])
def test_eval_checks_it_can_write_before_evaluating(trained, tmp_path, capsys, no_evaluation, where):
    import os
    import stat

    if where == "a folder":
        output, message = tmp_path, "is a folder"
    elif where == "through a file":
        (tmp_path / "a_file").write_text("x")
        output, message = tmp_path / "a_file" / "results.json", "is a file, not a folder"
    elif where == "read-only folder":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        output, message = locked / "results.json", "is not writable"
    else:
        output, message = tmp_path / "results.json", "read-only"
        output.write_text(json.dumps({"results": {}, "retnet_hf": {}}))
        output.chmod(stat.S_IRUSR)
    if os.geteuid() == 0 and where.startswith("read-only"):
        pytest.skip("root writes through read-only permissions; the check cannot be seen as root")
    assert main(["eval", str(trained), "--output", str(output)]) == 2
    assert message in capsys.readouterr().err


def test_an_earlier_result_is_replaced_whole_or_kept(trained, tmp_path, monkeypatch):
    """A second run replaces its earlier results file; a run that cannot finish writing (a full disk) leaves the
    earlier one as it was and no partial file beside it."""
    import errno
    import os

    output = tmp_path / "results.json"
    argv = ["eval", str(trained), "--tasks", PERPLEXITY, "--limit", "1", "--output", str(output)]
    assert main(argv) == 0
    first = output.read_bytes()
    assert main(argv) == 0 and json.loads(output.read_text())["results"]

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    output.write_bytes(first)
    with pytest.raises(OSError, match="No space left"):
        from retnet_hf.evaluation import EvalSettings, evaluate_folder

        evaluate_folder(EvalSettings(folder=str(trained), tasks=(PERPLEXITY,), limit=1, output=str(output)))
    assert output.read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_killed_eval_s_scratch_folder_is_removed_by_the_next(trained, tmp_path, capsys):
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from retnet_hf.model_folder import host_tag

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    stale = Path(tempfile.gettempdir()) / f"retnet-hf-eval-{dead}-{host_tag()}-0a1b2c3d"
    stale.mkdir()
    (stale / "tasks").mkdir()
    argv = ["eval", str(trained), "--tasks", PERPLEXITY, "--limit", "1", "--output", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert not stale.exists()
    assert f"removed {stale}, the scratch folder of an interrupted retnet-hf eval (process {dead})" in (
        capsys.readouterr().err
    )


# ---------------------------------------------------------------------- odd data: a message, never a traceback


def _data_dir(tmp_path, shakespeare=None, parquet=None):
    import shutil

    from retnet_hf import sample_data

    folder = tmp_path / "data"
    folder.mkdir()
    if shakespeare is not None:
        (folder / SHAKESPEARE_HELD_OUT.name).write_text(shakespeare)
    if parquet == "copy":
        shutil.copy(sample_data.GUANACO, folder / sample_data.GUANACO.name)
    elif parquet is not None:
        (folder / sample_data.GUANACO.name).write_bytes(parquet)
    return folder


@pytest.mark.parametrize(
    "task, shakespeare, parquet, message",
    [
        (NEXT_LINE, "no speeches here, only prose\n\nand more prose\n", None, "0 speeches"),
        (NEXT_LINE, "KING:\nHo!\nHo!\n\nKING:\nHo!\nHo!\nHo!\n\n" * 50, None, "1 different lines"),
        (PERPLEXITY, "KING:\nshort\n", None, "needs a longer text"),
        (GENERATE, None, b"PAR1 this is not parquet", "cannot read it as a parquet file"),
    ],
    ids=["no-speeches", "one-line-repeated", "too-short", "damaged-parquet"],
)
def test_odd_local_data_is_a_message(trained, tmp_path, capsys, task, shakespeare, parquet, message):
    folder = _data_dir(tmp_path, shakespeare, parquet)
    argv = ["eval", str(trained), "--tasks", task, "--data-dir", str(folder), "--output", str(tmp_path / "r.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("retnet-hf eval: error: ") and message in last and "Traceback" not in err


def test_one_local_task_reads_only_its_own_data(trained, tmp_path):
    folder = _data_dir(tmp_path, shakespeare=SHAKESPEARE_HELD_OUT.read_text())  # no guanaco rows
    output = tmp_path / "r.json"
    argv = ["eval", str(trained), "--tasks", PERPLEXITY, "--limit", "1", "--data-dir", str(folder)]
    assert main(argv + ["--output", str(output)]) == 0
    assert list(json.loads(output.read_text())["results"]) == [PERPLEXITY]


@pytest.mark.parametrize("length", [8, 32])
def test_a_context_too_short_for_the_generation_task_is_a_message(trained, tmp_path, capsys, no_evaluation, length):
    argv = ["eval", str(trained), "--max-length", str(length), "--output", str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert "give more than 32" in capsys.readouterr().err


def test_eval_on_onnx_runtime_scores_as_pytorch_and_quantize_runs_there(trained, tasks, tmp_path, capsys, monkeypatch):
    """The folder exported float32, as `OnnxRetNetForCausalLM` in lm-eval's own HFLM: PyTorch's loglikelihoods (to
    1e-4) and generations; `eval --quantize int8` runs a quantized export made once in HF_HOME and says so."""
    import huggingface_hub

    from retnet_hf.onnx_runtime import OnnxRetNetForCausalLM, export_onnx

    pytest.importorskip("onnxruntime", reason="the onnx extra")
    export_onnx(trained, tmp_path / "onnx")
    tokenizer = load_tokenizer(str(trained))
    manager = task_manager([LOCAL_TAG], [tasks])
    responses = {}
    for name, model in (
        ("torch", load_causal_lm(str(trained)).eval()),
        ("onnx", OnnxRetNetForCausalLM.from_folder(tmp_path / "onnx")),
    ):
        responses[name] = local_task_responses(model, tokenizer, manager, batch_size=4, limit=4)
    for name in (NEXT_LINE, PERPLEXITY):
        for doc_onnx, doc_torch in zip(responses["onnx"][name], responses["torch"][name]):
            assert scores(doc_onnx) == pytest.approx(scores(doc_torch), rel=1e-4, abs=1e-4), name
    assert responses["onnx"][GENERATE] == responses["torch"][GENERATE]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "results.json"
    assert main(["eval", str(trained), "--quantize", "int8", "--limit", "3", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["retnet_hf"]["quantize"] == "int8" and set(results["results"]) >= set(LOCAL_TASKS)
    assert len(list((tmp_path / "hf" / "retnet-hf" / "onnx").iterdir())) == 1
    assert "exporting" in capsys.readouterr().err
