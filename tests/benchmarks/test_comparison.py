"""benchmarks/compare_with_transformer.py: RetNet against a same-size Llama, end to end in its quick mode."""

import json
import math
import re

import pytest
import torch

from retnet_hf.sample_data import SHAKESPEARE_TRAIN


SHAKESPEARE = SHAKESPEARE_TRAIN


def load_script():
    from benchmarks import compare_with_transformer

    return compare_with_transformer


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import contextlib
    import io

    script = load_script()
    out = tmp_path_factory.mktemp("comparison")
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            code = script.main(["--quick", "--text", str(SHAKESPEARE), "--output", str(out), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return code, printed.getvalue(), out, script.QUICK


def table_rows(text):
    rows = re.findall(
        r"^\| (RetNet|Llama) \| ([\d,]+) \| ([\d.e+-]+) \| ([\d.]+) \| ([\d.]+) \| (\*?) \|$", text, flags=re.M
    )
    return [
        (model, int(params.replace(",", "")), float(lr), float(final), float(low), mark == "*")
        for model, params, lr, final, low, mark in rows
    ]


def test_quick_comparison_runs_end_to_end(quick_run):
    code, printed, out, quick = quick_run
    assert code == 0
    rows = table_rows(printed)
    assert len(rows) == 2 * len(quick["learning_rates"])
    for model in ("RetNet", "Llama"):
        assert sorted(r[2] for r in rows if r[0] == model) == sorted(quick["learning_rates"])
        assert sum(r[5] for r in rows if r[0] == model) == 1  # one best learning rate marked per model
    assert (out / "table.md").read_text().strip() in printed
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_two_models_have_the_same_parameter_count(quick_run):
    _, printed, out, _ = quick_run
    rows = table_rows(printed)
    retnet = {r[1] for r in rows if r[0] == "RetNet"}
    llama = {r[1] for r in rows if r[0] == "Llama"}
    assert len(retnet) == len(llama) == 1
    assert abs(llama.pop() / retnet.pop() - 1) <= 0.03
    assert re.search(r"parameters: RetNet [\d,]+, Llama [\d,]+ \([+-]\d+\.\d+%\)", printed)


def test_both_models_learn_better_than_uniform(quick_run):
    _, printed, out, quick = quick_run
    results = json.loads((out / "results.json").read_text())
    uniform = math.log(results["vocab_size"])
    assert results["vocab_size"] <= quick["vocab_size"]
    for run in results["runs"]:
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == quick["steps"]
        assert run["final_loss"] < uniform, run
        assert run["final_loss"] < run["eval_losses"][0], run  # and below where it started
    for model, params, lr, final, low, _ in table_rows(printed):
        run = next(r for r in results["runs"] if r["model"] == model and r["learning_rate"] == lr)
        assert final == pytest.approx(run["final_loss"], abs=1e-4) and low <= final


@pytest.mark.parametrize("d_model,layers,vocab", [(64, 2, 500), (128, 4, 2048), (256, 6, 8192), (512, 6, 1000)])
def test_the_llama_width_matches_the_retnet_size(d_model, layers, vocab):
    from transformers import PreTrainedTokenizerFast

    from benchmarks.compare_with_transformer import ComparisonSettings, llama_model, retnet_model

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=None, tokenizer_object=_tiny_tokenizer())
    settings = ComparisonSettings(text="", d_model=d_model, layers=layers, llama_heads=4)
    retnet = retnet_model(settings, vocab, tokenizer)
    llama = llama_model(settings, retnet.config).num_parameters()
    assert abs(llama / retnet.num_parameters() - 1) <= 0.03, (retnet.num_parameters(), llama)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))


def test_a_missing_text_file_is_a_clear_error(tmp_path, capsys):
    script = load_script()
    assert script.main(["--quick", "--text", str(tmp_path / "missing.txt"), "--output", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
