"""`retnet-hf export-onnx` and the ONNX Runtime runner (retnet_hf/onnx_runtime.py), on one tiny model exported
once for the module (the export is most of this file's time):

- both graphs give PyTorch's logits and states (fp32, within 1e-4 of their scale) for single rows and left-padded
  batches, prompts of one token to several chunks, batch sizes other than the trace's, and at a position past
  2^24 (the phases are float64 in the graph too);
- greedy decoding is `model.generate()`'s token for token (end tokens and padding included); sampling is
  reproducible by seed and reduces to greedy at top_k=1; text in, text out;
- the state has one size whatever the prompt length and the number of steps;
- refused, with OUT left uncreated: an OUT that exists, a folder that is not RetNet, quantized weights, a folder
  without config.json; a failed export leaves neither OUT nor its staging folder.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import torch


pytest.importorskip("onnxruntime", reason="onnxruntime is in the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript is in the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnx", reason="onnx is in the onnx extra: pip install -e '.[onnx]'")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from retnet_hf import onnx_runtime  # noqa: E402
from retnet_hf.cli import main  # noqa: E402
from retnet_hf.errors import UsageError  # noqa: E402
from retnet_hf.model import CACHE_NAME  # noqa: E402
from retnet_hf.onnx_runtime import MANIFEST, OnnxRetNet, export_onnx, generate, left_padded  # noqa: E402

from conftest import cache_of, random_ids, tiny_model  # noqa: E402


TOLERANCE = 1e-4
CHUNK = 8  # tiny_config's recurrent_chunk_size: prompts of 9 and more tokens take several prefill calls


def word_tokenizer(vocab_size=64):
    """Token i is the word `w{i}`; w0 pads, w1 begins, w2 ends."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    model = tiny_model()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """The CLI's export of the tiny model (and what it printed)."""
    _, folder = source
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export-onnx", str(folder), str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def runner(exported):
    return OnnxRetNet(exported[0], threads=1)


@pytest.fixture(scope="module")
def model(source):
    return source[0]


def relative(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.abs(a - b.numpy()).max() / b.abs().max())


def left_padded_batch(lengths, seed=0):
    width = max(lengths)
    ids = random_ids(len(lengths), width, seed=seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, : width - length] = 0
        ids[row, : width - length] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------ the exported folder


def test_the_export_holds_two_graphs_with_dynamic_batch_and_length_the_config_and_the_tokenizer(exported, runner):
    out, printed = exported
    files = {path.name for path in out.iterdir()}
    assert {"prefill.onnx", "step.onnx", MANIFEST, "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert f"-> {out}" in printed and "checked against PyTorch" in printed
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["num_layers"], manifest["num_heads"], manifest["key_head_dim"], manifest["value_head_dim"]) == (
        2,
        2,
        16,
        24,
    )
    assert (manifest["chunk_size"], manifest["eos_token_id"], manifest["pad_token_id"]) == (CHUNK, 2, 0)
    states = [[name, ["batch", 2, 16, 24] if name.startswith("state") else ["batch", 2]] for name in _state_names()]
    prefill, step = runner.sessions["prefill"], runner.sessions["step"]
    assert [[i.name, i.shape] for i in prefill.get_inputs()] == [
        ["input_ids", ["batch", "length"]],
        ["attention_mask", ["batch", "length"]],
        ["num_tokens", []],
        ["logit_positions", ["kept"]],
        *states,
    ]
    assert [[i.name, i.shape] for i in step.get_inputs()] == [["input_ids", ["batch", 1]], ["num_tokens", []], *states]
    for session, logits in ((prefill, ["batch", "kept", 64]), (step, ["batch", 64])):
        assert [[o.name, o.shape] for o in session.get_outputs()] == [
            ["logits", logits],
            *[["next_" + name, shape] for name, shape in states],
        ]


def _state_names():
    return [f"{kind}.{i}" for i in range(2) for kind in ("state", "scale")]


# --------------------------------------------------------------------------------- logits and states vs PyTorch


@pytest.mark.parametrize(
    "lengths",
    [[1], [5], [CHUNK], [3 * CHUNK + 2], [11, 4, 1], [2 * CHUNK + 1, CHUNK, 2]],
    ids=["one-token", "short", "one-chunk", "four-chunks", "left-padded", "left-padded-chunks"],
)
def test_prefill_gives_pytorchs_logits_and_states(model, runner, lengths):
    ids, mask = left_padded_batch(lengths)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    logits, states, count = runner.prefill(ids.numpy(), mask.numpy())
    assert count == ids.shape[1]
    assert relative(logits, out.logits[:, -1]) < TOLERANCE
    expected = [tensor for state in cache_of(out).states for tensor in state]
    assert len(states) == len(expected)
    for got, reference in zip(states, expected):
        assert relative(got, reference) < TOLERANCE
    every, _, _ = runner.prefill(ids.numpy(), mask.numpy(), all_logits=True)  # what eval scores a text with
    assert every.shape == tuple(out.logits.shape)
    real = mask.bool()
    assert relative(every[real.numpy()], out.logits[real]) < TOLERANCE


@pytest.mark.parametrize("lengths", [[6], [9, 3, 14]], ids=["single", "left-padded"])
def test_each_step_gives_pytorchs_logits_and_states(model, runner, lengths):
    ids, mask = left_padded_batch(lengths, seed=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = cache_of(out)
        _, states, count = runner.prefill(ids.numpy(), mask.numpy())
        tokens = random_ids(len(lengths), 6, seed=2)
        for t in range(tokens.shape[1]):
            expected = model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
            logits, states = runner.step(tokens[:, t].numpy(), states, count)
            count += 1
            assert relative(logits, expected) < TOLERANCE, t
        for got, reference in zip(states, [tensor for state in cache.states for tensor in state]):
            assert relative(got, reference) < TOLERANCE


def test_a_step_far_past_two_to_the_24_matches_pytorch(model, runner):
    """The rotation phases are computed in float64 and reduced modulo 2 pi in the graph as in the model."""
    ids = random_ids(2, 5, seed=3)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = cache_of(out)
        _, states, _ = runner.prefill(ids.numpy())
        position = 123_456_789
        cache.num_tokens = position
        token = random_ids(2, 1, seed=4)
        expected = model(token, cache=cache, use_cache=True).logits[:, -1]
    logits, _ = runner.step(token.numpy(), states, position)
    assert relative(logits, expected) < TOLERANCE


# ------------------------------------------------------------------------------------------------- generation


def test_greedy_decoding_is_generates_for_one_row(model, runner):
    ids = random_ids(1, 11, seed=5)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert np.array_equal(runner.generate(ids.numpy(), max_new_tokens=24), expected.numpy())
    assert np.array_equal(generate(runner, ids[0].tolist(), max_new_tokens=24), expected.numpy())  # a list of ids


def test_greedy_decoding_is_generates_for_a_left_padded_batch_with_an_end_token(model, runner):
    ids, mask = left_padded_batch([13, 5, 2 * CHUNK + 3], seed=6)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])  # a token that the first row generates third: it ends there
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos)
    got = runner.generate(ids.numpy(), mask.numpy(), max_new_tokens=16, eos_token_id=eos)
    assert np.array_equal(got, expected.numpy())
    assert got[0, ids.shape[1] + 3 :].tolist() == [0] * (got.shape[1] - ids.shape[1] - 3)  # padded after its end
    # ragged lists are left-padded by the runner itself
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert np.array_equal(runner.generate(rows, max_new_tokens=16, eos_token_id=eos), expected.numpy())


def test_sampling_is_reproducible_by_seed_and_greedy_at_top_k_1(runner):
    ids, mask = left_padded_batch([7, 3], seed=7)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, top_p=None)
    first = runner.generate(ids.numpy(), mask.numpy(), seed=1, **kwargs)
    assert np.array_equal(first, runner.generate(ids.numpy(), mask.numpy(), seed=1, **kwargs))
    assert not np.array_equal(first, runner.generate(ids.numpy(), mask.numpy(), seed=2, **kwargs))
    greedy = runner.generate(ids.numpy(), mask.numpy(), max_new_tokens=12)
    for narrow in (dict(top_k=1), dict(top_k=0, top_p=1e-9)):
        sampled = runner.generate(ids.numpy(), mask.numpy(), max_new_tokens=12, do_sample=True, seed=3, **narrow)
        assert np.array_equal(sampled, greedy), narrow


def test_sampling_keeps_to_the_top_k_and_the_top_p_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], dtype=np.float32))
    top_2 = onnx_runtime._sampler(1.0, 2, None, seed=0)
    drawn = np.stack([top_2(logits) for _ in range(400)])
    assert set(drawn[:, 0]) == {0, 1} and set(drawn[:, 1]) == {3, 2}
    nucleus = onnx_runtime._sampler(1.0, None, 0.7, seed=0)
    drawn = np.stack([nucleus(logits) for _ in range(400)])  # 0.5 + 0.3 >= 0.7
    assert set(drawn[:, 0]) == {0, 1} and set(drawn[:, 1]) == {3, 2}
    assert abs((drawn[:, 0] == 0).mean() - 0.5 / 0.8) < 0.1


def test_text_in_text_out(model, exported):
    out, _ = exported
    tokenizer = word_tokenizer()
    texts = generate(out, ["w5 w6 w7 w8", "w9"], max_new_tokens=6)
    one = generate(out, "w9", max_new_tokens=6)
    assert isinstance(texts, list) and texts[1] == one
    ids = tokenizer("w5 w6 w7 w8", return_tensors="pt").input_ids
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert texts[0] == tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_state_has_one_size_whatever_the_context(runner):
    def nbytes(states):
        return [state.nbytes for state in states]

    _, short, count = runner.prefill(random_ids(1, 3).numpy())
    _, long, _ = runner.prefill(random_ids(1, 5 * CHUNK).numpy())
    sizes = nbytes(short)
    assert nbytes(long) == sizes
    assert sum(sizes) == 2 * (2 * 16 * 24 + 2) * 4  # layers x (S [H, D, Dv] + scale [H]) float32
    states = short
    for step in range(20):
        _, states = runner.step(np.array([5]), states, count + step)
        assert nbytes(states) == sizes


# --------------------------------------------------------------------------------------------------- refusals


def test_an_existing_out_is_refused_and_left_alone(source, exported, capsys):
    _, folder = source
    out, _ = exported
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    assert main(["export-onnx", str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retnet-hf export-onnx: error: ") and "already exists" in err and len(err.splitlines()) == 1
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before


def _folder_with_config(path, **changes):
    path.mkdir()
    config = tiny_model().config.to_dict()
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: _folder_with_config(path, model_type="llama"), "is not a RetNet folder (model_type 'llama'"),
        (
            lambda path: _folder_with_config(path, quantization_config={"quant_method": "bitsandbytes"}),
            "quantized weights (bitsandbytes)",
        ),
        (lambda path: path.mkdir() or path, "not a model folder (no config.json)"),
        (lambda path: path, "no such model folder"),
    ],
    ids=["not-retnet", "quantized", "no-config", "missing"],
)
def test_what_cannot_be_exported_is_refused_before_anything_is_written(tmp_path, capsys, make, message):
    folder = make(tmp_path / "source")
    out = tmp_path / "out"
    assert main(["export-onnx", str(folder), str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_export_leaves_neither_out_nor_its_staging_folder(source, tmp_path, monkeypatch):
    _, folder = source
    calls = []

    def half_then_fail(module, args, input_names, output_names, path):
        calls.append(path)
        path.write_bytes(b"half an ONNX file")
        if len(calls) == 2:
            raise RuntimeError("the exporter failed")

    monkeypatch.setattr(onnx_runtime, "_export_graph", half_then_fail)
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError, match="the exporter failed"):
        export_onnx(folder, out)
    assert len(calls) == 2 and not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder and the parent folder the export made are gone


def test_a_killed_export_s_staging_folder_is_removed_by_the_next_export(source, exported, tmp_path, capsys):
    """What a kill -9 leaves (a staging folder named with its dead process) goes with the next export into OUT."""
    import subprocess
    import sys

    from retnet_hf.model_folder import host_tag

    _, folder = source
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.exporting-{int(dead.stdout)}-{host_tag()}-0a1b2c3d"
    stale.mkdir()
    (stale / "prefill.onnx").write_bytes(b"half an ONNX file")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(onnx_runtime, "_export_graph", lambda module, args, i, o, path: path.write_bytes(b"x"))
    monkeypatch.setattr(onnx_runtime, "_check_against_pytorch", lambda model, staging, tolerance: {})
    try:
        assert main(["export-onnx", str(folder), str(tmp_path / "out")]) == 0
    finally:
        monkeypatch.undo()
    assert f"removed {stale}, the staging folder of an interrupted export into out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_tokenizer_that_does_not_load_stops_the_export(source, tmp_path, capsys):
    import shutil

    _, folder = source
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tokenizer.json").write_bytes(b"\x00 not a tokenizer")
    assert main(["export-onnx", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "its tokenizer does not load" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_output_through_a_file_is_a_message(source, tmp_path, capsys):
    _, folder = source
    (tmp_path / "a_file").write_text("x")
    assert main(["export-onnx", str(folder), str(tmp_path / "a_file" / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_a_graph_that_disagrees_with_pytorch_is_not_published(source, tmp_path, monkeypatch):
    _, folder = source

    def disagree(model, staging, tolerance):
        assert (staging / "prefill.onnx").is_file() and (staging / MANIFEST).is_file()
        raise UsageError("the exported prefill graph disagrees with PyTorch")

    monkeypatch.setattr(onnx_runtime, "_export_graph", lambda module, args, i, o, path: path.write_bytes(b"x"))
    monkeypatch.setattr(onnx_runtime, "_check_against_pytorch", disagree)
    with pytest.raises(UsageError, match="disagrees"):
        export_onnx(folder, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_runner_refuses_bad_inputs(runner, tmp_path):
    with pytest.raises(ValueError, match="left padding"):
        left_padded(np.array([[5, 6, 0]]), np.array([[1, 1, 0]]))  # right padding
    with pytest.raises(ValueError, match="1 for tokens and 0 for padding"):
        left_padded(np.array([[5, 6]]), np.array([[0, 2]]))
    with pytest.raises(ValueError, match="at least one token"):
        left_padded([[5], []])
    with pytest.raises(ValueError, match="temperature"):
        runner.generate([[5]], do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        runner.generate([[5]], do_sample=True, top_p=1.5)
    with pytest.raises(UsageError, match="not an exported RetNet folder"):
        OnnxRetNet(tmp_path)
    assert runner.generate([[5, 6]], max_new_tokens=0).tolist() == [[5, 6]]
    vocab = runner.vocab_size
    for bad in (-1, vocab):  # ONNX's Gather would read -1 as the table's last row
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {vocab}\), got {bad}"):
            runner.prefill(np.array([[5, bad]]))
        with pytest.raises(ValueError, match="token ids must lie in"):
            runner.step(np.array([bad]), runner.empty_states(1), 3)
        with pytest.raises(ValueError, match="token ids must lie in"):
            runner.generate([[5, bad]], max_new_tokens=2)


# -------------------------------------------------------------------------------------------------- benchmark


def test_the_benchmark_prints_a_row_per_path_and_saves_a_png(source, exported, tmp_path, capsys):
    """benchmarks/onnx_decode.py on the exported tiny model (the compiled path is left out: it compiles for
    minutes); no timing is asserted."""
    from benchmarks import onnx_decode

    _, folder = source
    out, _ = exported
    argv = ["--quick", "--model", str(folder), "--onnx", str(out), "--paths", "eager,onnx", "--out", str(tmp_path)]
    assert onnx_decode.main(argv + ["--bandwidth-mb", "16"]) == 0
    printed = capsys.readouterr().out
    assert "CPU:" in printed and "load average" in printed
    lines = printed.splitlines()
    start = lines.index("| " + " | ".join(onnx_decode.COLUMNS) + " |") + 2
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start : start + 2]]
    assert [row[0] for row in rows] == ["PyTorch eager", "ONNX Runtime"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    assert rows[1][-1] == "yes"  # ONNX Runtime chose eager's greedy tokens
    assert (tmp_path / "onnx_decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ quantized graphs


@pytest.mark.parametrize("scheme, operator", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_a_quantized_export_is_checked_and_decodes(source, tmp_path, capsys, scheme, operator):
    """`export-onnx --quantize`: ONNX Runtime's own quantizer on both graphs (its quantized operators in them), the
    check against PyTorch's float32 logits within the scheme's tolerance, the measured difference in the manifest,
    and a runner that decodes from it (the state stays float32)."""
    import onnx

    model, folder = source
    out = tmp_path / f"tiny-{scheme}"
    assert main(["export-onnx", str(folder), str(out), "--quantize", scheme]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    quantization = manifest["quantization"]
    assert quantization["scheme"] == scheme and manifest["state_dtype"] == "float32"
    for graph in ("prefill", "step"):
        difference = quantization["checked_logit_difference"][graph]
        assert 0 < difference <= onnx_runtime.QUANTIZED_TOLERANCE[scheme]  # quantized, and within what is allowed
        nodes = {node.op_type for node in onnx.load(str(out / onnx_runtime.GRAPHS[graph])).graph.node}
        assert operator in nodes
    runner = OnnxRetNet(out, threads=1)
    ids = runner.generate([[5, 6, 7]], max_new_tokens=6)
    assert ids.shape == (1, 9) and runner.empty_states(1)[0].dtype == np.float32


def test_a_quantized_export_that_disagrees_too_much_is_not_published(source, tmp_path, monkeypatch, capsys):
    _, folder = source
    monkeypatch.setitem(onnx_runtime.QUANTIZED_TOLERANCE, "int8", 1e-9)  # as if the graph were broken
    assert main(["export-onnx", str(folder), str(tmp_path / "out"), "--quantize", "int8"]) == 2
    assert "disagrees with PyTorch" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- the exported folder as a transformers causal LM


@pytest.fixture(scope="module")
def onnx_lm(exported):
    return onnx_runtime.OnnxRetNetForCausalLM.from_folder(exported[0], threads=1)


def test_the_onnx_causal_lm_scores_a_left_padded_batch_as_pytorch(model, onnx_lm):
    """What lm-eval's HFLM asks of a model: every position's logits of a batch, without a cache."""
    ids, mask = left_padded_batch([2 * CHUNK + 3, 5, 1])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = onnx_lm(ids, attention_mask=mask).logits
    assert got.shape == expected.shape and got.dtype == torch.float32
    real = mask.bool()
    assert relative(got[real].numpy(), expected[real]) < TOLERANCE


@pytest.mark.parametrize("kwargs", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_the_onnx_causal_lm_generates_pytorchs_tokens_and_continues_from_its_cache(model, onnx_lm, kwargs):
    """generate() on ONNX Runtime: the same tokens and per-step scores as on PyTorch, for a left-padded batch; and a
    second call that continues from the returned cache (as chat does) equals PyTorch's continuation."""
    ids, mask = left_padded_batch([CHUNK + 3, 4], seed=5)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs)
    out = {}
    for name, lm in (("torch", model), ("onnx", onnx_lm)):
        out[name] = lm.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **settings)
    assert torch.equal(out["onnx"].sequences, out["torch"].sequences)
    for got, expected in zip(out["onnx"].scores, out["torch"].scores):
        assert relative(got.numpy(), expected) < TOLERANCE
    if kwargs:
        return
    more = random_ids(2, 3, seed=6)
    follow = {}
    for name, lm in (("torch", model), ("onnx", onnx_lm)):
        sequence = torch.cat([out[name].sequences, more], dim=1)
        follow[name] = lm.generate(
            sequence,
            attention_mask=torch.cat([mask, torch.ones(2, sequence.shape[1] - mask.shape[1], dtype=mask.dtype)], 1),
            **{CACHE_NAME: getattr(out[name], CACHE_NAME)},
            max_new_tokens=4,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert torch.equal(follow["onnx"], follow["torch"])


def test_the_onnx_causal_lm_refuses_what_its_graphs_cannot_do(model, onnx_lm):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="input_ids only, not inputs_embeds"):
        onnx_lm(inputs_embeds=torch.zeros(1, 4, model.config.decoder_embed_dim))
    with pytest.raises(ValueError, match="not labels"):
        onnx_lm(ids, labels=ids)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'temperature'"):
        onnx_lm(ids, temperature=0.5)
    with pytest.raises(ValueError, match="roll the state back"):
        onnx_lm.generate(ids, prompt_lookup_num_tokens=2, max_new_tokens=3, pad_token_id=0)


def test_generate_quantize_exports_once_and_runs_the_export(source, exported, tmp_path, capsys, monkeypatch):
    """`generate --quantize int4` exports the folder into HF_HOME the first time, reuses it after; `generate` on an
    export-onnx folder runs it, greedy, as the PyTorch model writes."""
    import huggingface_hub

    _, folder = source
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    command = ["generate", str(folder), "--prompt", "w5 w9", "--greedy", "--max-new-tokens", "6"]
    printed = []
    for _ in range(2):
        assert main([*command, "--quantize", "int4"]) == 0
        printed.append(capsys.readouterr())
    made = list((tmp_path / "hf" / "retnet-hf" / "onnx").iterdir())
    assert len(made) == 1 and json.loads((made[0] / MANIFEST).read_text())["quantization"]["scheme"] == "int4"
    assert "exporting" in printed[0].err and "exporting" not in printed[1].err
    assert printed[0].out == printed[1].out and printed[0].out.startswith("w5 w9")
    texts = []
    for model in (folder, exported[0]):
        assert main(["generate", str(model), *command[2:]]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0].split()) > 2


def test_the_commands_run_onnx_runtime_with_one_torch_thread(exported, capsys):
    """torch's threads would busy-wait between generate()'s small operations and take the cores from ONNX Runtime's:
    a command that runs an exported folder leaves torch one."""
    torch.set_num_threads(2)
    assert main(["generate", str(exported[0]), "--prompt", "w5", "--greedy", "--max-new-tokens", "2"]) == 0
    assert torch.get_num_threads() == 1
