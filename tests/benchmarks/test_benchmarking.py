"""The benchmarks (benchmarks/): correctness only, no timing is asserted.

- `same_size_llama` lands within 3% of RetNet's parameter count (counted on real modules), and refuses when it
  cannot;
- `PeakMemory` sees a large allocation and does not invent one;
- `interleaved_timings` runs every measure once per round in a rotating order, `paired_median_ratio` takes the
  median of the per-round ratios, and the prefill benchmark times its variants that way (a scripted clock);
- each script's `--quick` mode runs end to end (through its `main`), prints a table with its columns and writes a
  PNG; torchscale's and ours' logits agree in that run.
"""

import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks import assisted, common, decode, prefill, torchscale
from retnet_hf import RetNetConfig, RetNetForCausalLM
from retnet_hf.model.modeling_retnet import NATIVE_RECURRENT_CACHE

from conftest import cache_of


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def count_on_meta(model_class, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


@pytest.mark.parametrize("size", ["125m", "base"])
def test_same_size_llama_is_within_three_percent(size):
    retnet_config = common.size_config(size)
    llama_config = common.same_size_llama(retnet_config)
    retnet_count = count_on_meta(RetNetForCausalLM, retnet_config)
    llama_count = count_on_meta(LlamaForCausalLM, llama_config)
    assert retnet_count == common.retnet_parameter_count(retnet_config)
    assert llama_count == common.llama_parameter_count(llama_config)
    assert abs(llama_count / retnet_count - 1) <= 0.03, (retnet_count, llama_count)
    assert llama_config.vocab_size == retnet_config.vocab_size
    assert llama_config.hidden_size == retnet_config.decoder_embed_dim
    assert llama_config.num_hidden_layers == retnet_config.decoder_layers
    assert llama_config._attn_implementation == "sdpa"
    assert llama_config.tie_word_embeddings == retnet_config.share_decoder_input_output_embed


def test_125m_sizes_are_as_documented():
    config = common.size_config("125m")
    assert (config.decoder_embed_dim // config.decoder_retention_heads) == 256
    assert common.retnet_parameter_count(config) == 124_373_760
    llama = common.same_size_llama(config)
    assert (llama.num_attention_heads, llama.head_dim, llama.intermediate_size) == (12, 64, 1696)
    assert common.llama_parameter_count(llama) == 124_373_760  # 4 d^2 + 3 d 1696 = 2 d^2 + 6 d 1104 exactly


def test_same_size_llama_refuses_an_impossible_match():
    # Llama's attention (4 d^2 per layer) alone outweighs a RetNet with almost no value or feed-forward width.
    retnet_config = RetNetConfig(
        vocab_size=16,
        decoder_embed_dim=256,
        decoder_value_embed_dim=2,
        decoder_ffn_embed_dim=2,
        decoder_layers=2,
        decoder_retention_heads=2,
    )
    with pytest.raises(ValueError, match="within 3%"):
        common.same_size_llama(retnet_config)


def test_peak_memory_sees_a_large_allocation_and_nothing_else():
    size = 256 * common.MB
    with common.PeakMemory() as peak:
        x = torch.ones(size // 4, dtype=torch.float32)  # written, so its pages are resident
        y = x[: size // 8] + 1  # a second, half-size tensor alive at the same time
        time.sleep(0.05)
        del x, y  # freed inside the block: only the profiler's events and the sampler can have seen them
    assert peak.method == "tensor bytes from torch.profiler"
    # exact up to a few bytes of scalar tensors: the two tensors' bytes
    assert 0 <= peak.peak_bytes - (size + size // 2) < 1024, peak.peak_bytes
    assert peak.rss_peak_bytes > 0.8 * size, peak.rss_peak_mb

    with common.PeakMemory() as idle:
        time.sleep(0.05)
    assert idle.peak_bytes == 0
    assert idle.rss_peak_bytes < 0.2 * size, idle.rss_peak_mb


def test_cache_bytes_match_the_formulas():
    retnet, llama = common.build_models(common.size_config("tiny"))
    tokens = torch.zeros(2, 40, dtype=torch.long)
    with torch.no_grad():
        retnet_cache = cache_of(retnet(tokens, use_cache=True))
        llama_cache = cache_of(llama(tokens, use_cache=True))
    assert common.cache_bytes(retnet_cache) == common.retnet_state_bytes(retnet.config, batch=2)
    assert common.cache_bytes(llama_cache) == common.llama_kv_bytes(llama.config, 40, batch=2)
    # per-step weight bytes leave out the input embedding table (untied), and only it
    total = sum(p.numel() * 4 for p in retnet.parameters())
    assert common.weight_bytes_per_token(retnet) == total - retnet.model.embed_tokens.weight.numel() * 4


def test_chunkwise_crossover_ignores_one_chunk_and_needs_every_longer_length():
    def rows(pairs):
        return [
            {"variant": variant, "length": length, "mode": "forward", "seconds": seconds, "skipped": None}
            for length, (parallel, chunkwise) in pairs.items()
            for variant, seconds in (("RetNet parallel", parallel), ("RetNet chunkwise", chunkwise))
        ]

    assert (
        prefill.chunkwise_crossover(
            rows({512: (2.0, 1.0), 1024: (1.0, 2.0), 2048: (3.0, 1.0)}), "forward", chunk_size=512
        )
        == 2048
    )
    assert (
        prefill.chunkwise_crossover(
            rows({512: (2.0, 1.0), 1024: (3.0, 2.0), 2048: (9.0, 1.0)}), "forward", chunk_size=512
        )
        == 1024
    )
    assert prefill.chunkwise_crossover(rows({1024: (1.0, 2.0)}), "forward", chunk_size=512) is None


def test_interleaved_timings_runs_every_measure_once_per_round_in_a_rotating_order():
    calls = []

    def measure(name):
        def call():
            calls.append(name)
            return float(len(calls))  # the call's place in the whole sequence

        return call

    figures = common.interleaved_timings({name: measure(name) for name in "abc"}, rounds=3)
    assert calls == list("abc") + list("bca") + list("cab")
    # each key's figures in round order: its place in each round's calls
    assert figures == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}
    assert common.interleaved_timings({"a": measure("a")}, rounds=2) == {"a": [10.0, 11.0]}


def test_paired_median_ratio_is_the_median_of_the_per_round_ratios():
    # per round 0.5, 2, 3: median 2, where the ratio of the medians (3 / 2) would be 1.5
    assert common.paired_median_ratio([1.0, 10.0, 3.0], [2.0, 5.0, 1.0]) == 2.0
    with pytest.raises(ValueError, match="equally long"):
        common.paired_median_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        common.paired_median_ratio([], [])


def test_prefill_times_the_variants_side_by_side(monkeypatch):
    """The order of the forward calls, and the figures a scripted clock gives: the memory run and the rounds'
    runs per variant, each round running every variant once, and `x Llama time` the median of the per-round
    ratios (not the ratio of the medians)."""
    retnet, llama = common.build_models(common.size_config("tiny"))
    calls = []
    retnet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(f"RetNet {kwargs['retention_form']}"), with_kwargs=True
    )
    llama.register_forward_pre_hook(lambda module, args: calls.append("Llama SDPA"))
    scripted = {"RetNet parallel": [3.0, 12.0, 5.0], "RetNet chunkwise": [1.0, 4.8, 1.6], "Llama SDPA": [2.0, 8.0, 4.0]}
    timed_calls = []

    def scripted_timed(fn, device="cpu"):
        fn()
        variant = calls[-1]
        timed_calls.append(variant)
        return scripted[variant][timed_calls.count(variant) - 1]

    monkeypatch.setattr(prefill, "timed", scripted_timed)
    rows = prefill.prefill_benchmark(retnet, llama, [32], modes=["forward"], rounds=3)
    parallel, chunkwise, llama_sdpa = prefill.PREFILL_VARIANTS
    warm_up = memory = [parallel, chunkwise, llama_sdpa]
    rounds = [parallel, chunkwise, llama_sdpa, chunkwise, llama_sdpa, parallel, llama_sdpa, parallel, chunkwise]
    assert calls == warm_up + memory + rounds
    assert timed_calls == rounds
    by_variant = {row["variant"]: row for row in rows}
    for variant, figures in scripted.items():
        assert by_variant[variant]["seconds by round"] == figures
        assert by_variant[variant]["seconds"] == sorted(figures)[1]
        assert by_variant[variant]["peak MB"] > 0
    # parallel / Llama per round: 1.5, 1.5, 1.25 (ratio of medians 1.25); chunkwise: 0.5, 0.6, 0.4 (0.4)
    assert math.isclose(by_variant[parallel]["x Llama time"], 1.5)
    assert math.isclose(by_variant[chunkwise]["x Llama time"], 0.5)
    assert by_variant[llama_sdpa]["x Llama time"] is None
    lines = prefill.prefill_summary(rows, chunk_size=16)
    assert "forward at 32 tokens: RetNet chunkwise takes 0.50x the time of Llama SDPA, paired per round" in lines
    assert "forward at 32 tokens: RetNet parallel takes 1.50x the time of Llama SDPA, paired per round" in lines


def test_parse_ints():
    assert common.parse_ints("512,2k, 16k") == [512, 2048, 16384]
    assert common.parse_ints("32 64") == [32, 64]


def table_rows(output: str, columns):
    """The rows of the markdown table whose header is exactly `columns`."""
    lines = output.splitlines()
    header = "| " + " | ".join(columns) + " |"
    assert header in lines, output
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_png(path: Path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_bench_decode_quick(tmp_path, capsys):
    script = decode
    assert script.main(["--quick", "--out", str(tmp_path), "--bandwidth-mb", "16"]) == 0
    output = capsys.readouterr().out
    assert "CPU:" in output and "torch" in output and "measured read bandwidth" in output
    rows = table_rows(output, script.COLUMNS)
    # tiny contexts 32 and 64, batch 1 and 2, two models, two paths
    assert len(rows) == 2 * 2 * 2 * 2
    keys = {(row[0], row[1], row[2], row[3]) for row in rows}
    assert ("RetNet", "64", "2", "generate") in keys and ("Llama", "32", "1", "step") in keys
    column = {name: script.COLUMNS.index(name) for name in script.COLUMNS}
    for row in rows:
        assert all(float(row[column[name]]) > 0 for name in ("ms/step", "tokens/s", "ideal tokens/s"))
        # the paired ratios: RetNet's tokens/s over Llama's on RetNet's rows, generate over step on generate's
        assert (row[column["x Llama tokens/s"]] != "") == (row[0] == "RetNet")
        assert (row[column["x step time"]] != "") == (row[3] == "generate")
    check_png(tmp_path / "decode.png")
    saved = json.loads((tmp_path / "decode.json").read_text())
    # 3 rounds (the default); the medians and the paired ratios are those of the rounds' figures
    by_key = {(row["model"], row["context"], row["batch"], row["path"]): row for row in saved}
    for (model, context, batch, path), row in by_key.items():
        assert len(row["ms/step by round"]) == 3
        assert math.isclose(row["ms/step"], statistics.median(row["ms/step by round"]))
        if model == "RetNet":
            llama_rounds = by_key[("Llama", context, batch, path)]["ms/step by round"]
            ratios = [theirs / ours for theirs, ours in zip(llama_rounds, row["ms/step by round"])]
            assert math.isclose(row["x Llama tokens/s"], statistics.median(ratios))
        if path == "generate":
            step_rounds = by_key[(model, context, batch, "step")]["ms/step by round"]
            ratios = [generate / step for generate, step in zip(row["ms/step by round"], step_rounds)]
            assert math.isclose(row["x step time"], statistics.median(ratios))
    assert "RetNet/Llama tokens/s = " in output and "vs the step loop, paired per round" in output
    # the state does not grow with the context; the KV cache doubles from 32 to 64 tokens
    cache = {(row["model"], row["context"]): row["cache MB"] for row in saved if row["batch"] == 1}
    assert cache[("RetNet", 32)] == cache[("RetNet", 64)]
    assert math.isclose(cache[("Llama", 64)], 2 * cache[("Llama", 32)])


@pytest.mark.skipif(not NATIVE_RECURRENT_CACHE, reason="assisted generation of a RetNet needs transformers >= 5.25")
def test_bench_assisted_quick(tmp_path, capsys):
    assert assisted.main(["--quick", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "| prompt | prompt tokens | way | tokens/s | x plain |" in output
    rows = json.loads((tmp_path / "assisted.json").read_text())
    assert [(row["prompt"], row["way"]) for row in rows] == [
        (prompt, way) for prompt in ("prose", "repetitive") for way in assisted.WAYS
    ]
    by_key = {(row["prompt"], row["way"]): row for row in rows}
    for (prompt, way), row in by_key.items():
        assert row["same tokens as plain"] is True  # every way gives plain greedy's tokens
        plain = by_key[(prompt, "plain")]
        assert plain["target forwards"] == 12  # the prompt, then one token per forward
        ratios = [p / t for p, t in zip(plain["s by round"], row["s by round"])]
        assert math.isclose(row["x plain"], statistics.median(ratios))
    # the quoted half of the repetitive prompt is found: prompt lookup needs fewer forwards of the target
    assert by_key[("repetitive", "lookup")]["target forwards"] < 12


def test_bench_prefill_quick(tmp_path, capsys):
    script = prefill
    assert script.main(["--quick", "--out", str(tmp_path), "--bandwidth-mb", "16"]) == 0
    output = capsys.readouterr().out
    assert "CPU:" in output and "measured read bandwidth" in output
    rows = table_rows(output, script.COLUMNS)
    assert len(rows) == 3 * 2 * 2  # variants x lengths x modes
    assert {row[0] for row in rows} == set(prefill.PREFILL_VARIANTS)
    assert {row[3] for row in rows} == {"forward", "forward+backward"}
    column = {name: script.COLUMNS.index(name) for name in script.COLUMNS}
    assert all(float(row[column["seconds"]]) > 0 for row in rows)
    for row in rows:  # RetNet's time over Llama's, on RetNet's rows
        ratio = row[column["x Llama time"]]
        assert (ratio != "") == row[0].startswith("RetNet")
        assert ratio == "" or 0 < float(ratio) < math.inf
    assert "chunkwise (chunk 32)" in output
    assert "forward+backward at 128 tokens: RetNet chunkwise takes " in output
    check_png(tmp_path / "prefill.png")
    saved = json.loads((tmp_path / "prefill.json").read_text())
    assert all(len(row["seconds by round"]) == 3 for row in saved)  # the default 3 rounds
    # the tensor peak is exact and sees the training step's activations and logits
    peaks = {(row[0], row[3]): float(row[column["peak MB"]]) for row in rows if row[1] == "128"}
    assert all(peak > 0 for peak in peaks.values())
    assert peaks[("RetNet chunkwise", "forward+backward")] > peaks[("RetNet chunkwise", "forward")]


def test_bench_prefill_names_an_unknown_variant(capsys):
    script = prefill
    with pytest.raises(SystemExit) as stop:
        script.main(["--quick", "--variants", "retnet-chunkwise"])
    assert stop.value.code == 2
    assert "unknown ['retnet-chunkwise']; choose from RetNet parallel, RetNet chunkwise" in capsys.readouterr().err


def test_bench_torchscale_quick(tmp_path, capsys):
    pytest.importorskip("torchscale")
    pytest.importorskip("fairscale")
    script = torchscale
    assert script.main(["--quick", "--out", str(tmp_path), "--bandwidth-mb", "16"]) == 0
    output = capsys.readouterr().out
    assert "CPU:" in output and "measured read bandwidth" in output
    rows = table_rows(output, script.COLUMNS)
    assert [row[0] for row in rows] == ["16", "64"]
    check_png(tmp_path / "torchscale.png")
    saved = json.loads((tmp_path / "torchscale.json").read_text())
    # same weights, same logits: float32 rounding only
    assert all(row["max rel diff"] < 1e-4 for row in saved), saved


def test_prefill_skips_points_that_would_not_fit():
    retnet, llama = common.build_models(common.size_config("tiny"))
    rows = prefill.prefill_benchmark(retnet, llama, [32], modes=["forward"], memory_fraction=1e-12)
    assert len(rows) == 3
    assert all(row["skipped"].startswith("needs ~") and "seconds" not in row for row in rows)
    table = common.format_table(rows, ["variant", "length", "seconds"])
    assert table.count("skipped: needs ~") == 3


def test_prefill_training_step_with_gradient_checkpointing():
    retnet, llama = common.build_models(common.size_config("tiny"))
    rows = prefill.prefill_benchmark(retnet, llama, [48], modes=["forward+backward"], gradient_checkpointing=True)
    assert [row["variant"] for row in rows] == list(prefill.PREFILL_VARIANTS)
    assert all(row["skipped"] is None and row["seconds"] > 0 for row in rows)
    assert retnet.model.gradient_checkpointing and not retnet.training  # back in eval mode afterwards
    assert all(p.grad is None for p in retnet.parameters())


def test_prefill_summary_speaks_of_the_parallel_form_only_where_it_was_asked_for():
    def row(variant, length, seconds=None, peak=None):
        skipped = None if seconds else "needs ~99.0 GiB"
        return {
            "variant": variant,
            "length": length,
            "mode": "forward+backward",
            "seconds": seconds,
            "peak MB": peak,
            "skipped": skipped,
        }

    without_parallel = [row("RetNet chunkwise", 1024, 2.0, 300.0), row("Llama SDPA", 1024, 2.0, 400.0)]
    assert prefill.prefill_summary(without_parallel, chunk_size=512) == [
        "forward+backward at 1024 tokens: peak tensor memory RetNet chunkwise 300 MB vs Llama SDPA 400 MB (0.75x)"
    ]
    with_parallel = without_parallel + [row("RetNet parallel", 512, 1.0, 100.0), row("RetNet parallel", 1024)]
    lines = prefill.prefill_summary(with_parallel, chunk_size=512)
    assert "forward+backward: parallel form skipped (memory) above 512 tokens" in lines
    assert "forward+backward: no length above one chunk (512) where both forms ran" in lines


def test_bench_finetune_quick(tmp_path, capsys):
    """Each (model, method) fine-tunes in its own process through TRL's SFTTrainer on the guanaco rows and gives
    real numbers (none is compared with a timing)."""
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    from benchmarks import finetune as script

    assert script.main(["--quick", "--out", str(tmp_path), "--bandwidth-mb", "16"]) == 0
    output = capsys.readouterr().out
    assert "CPU:" in output and "measured read bandwidth" in output and "TRL SFTTrainer" in output
    rows = table_rows(output, script.COLUMNS)
    assert {(row[0], row[1], row[2]) for row in rows} == {
        (model, method, "64") for model in script.MODELS for method in script.METHODS
    }
    saved = {(row["model"], row["method"]): row for row in json.loads((tmp_path / "finetune.json").read_text())}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # then the QLoRA rows say why they have no numbers
        assert all("skipped" in saved[(model, "qlora")] for model in script.MODELS)
        del saved[("RetNet", "qlora")], saved[("Llama", "qlora")]
    for row in saved.values():
        assert "skipped" not in row, row
        assert row["timed steps"] == 2 and len(row["step seconds"]) == 2
        assert row["steps/s"] > 0 and row["tokens/s"] > 0 and row["peak memory MB"] > 0
        assert 32 < row["tokens/step"] <= 64  # packed rows of at most --max-length tokens
        assert math.isfinite(row["loss"]) and row["loss"] > 0
    for model, projections in (("RetNet", 8), ("Llama", 7)):  # LoRA and QLoRA train the same adapters
        assert saved[(model, "lora")]["4-bit linears"] == 0
        if (model, "qlora") in saved:  # every projection of the 2 layers in nf4 (lm_head stays float)
            assert saved[(model, "qlora")]["4-bit linears"] == 2 * projections
            assert saved[(model, "lora")]["trainable params"] == saved[(model, "qlora")]["trainable params"]
    # r 16 on every projection: RetNet's eight per layer (tiny: d 128, dv 256, f 256, 2 layers), Llama's seven
    d, dv, f = 128, 256, 256
    retnet_lora = 2 * 16 * (2 * (d + d) + (d + dv) * 2 + (dv + d) + 2 * (d + f) + (f + d))
    assert saved[("RetNet", "lora")]["trainable params"] == retnet_lora
    assert saved[("Llama", "lora")]["trainable params"] > 0
    assert next(row for row in rows if row[:2] == ["RetNet", "lora"])[7].endswith("x")  # the ratio
    check_png(tmp_path / "finetune.png")


def test_bench_cpu_inference_quick_on_retnet_s_paths(tmp_path, capsys):
    """The CPU inference benchmark's RetNet side end to end (llama.cpp is not installed in CI): each path in its own
    process, the table, the plot; and its goal lines read the ratios it computed."""
    pytest.importorskip("onnxruntime", reason="the onnx extra")
    from benchmarks import cpu_inference

    variants = "retnet-eager-fp32,retnet-onnx-int8"
    argv = ["--quick", "--variants", variants, "--work", str(tmp_path / "models"), "--out", str(tmp_path)]
    assert cpu_inference.main(argv) == 0
    rows = json.loads((tmp_path / "cpu_inference.json").read_text())
    assert {(row["variant"], row["context"]) for row in rows} == {
        (variant, context) for variant in variants.split(",") for context in (64, 256)
    }
    assert all(row["decode tok/s"] > 0 and row["prefill 512 tok/s"] > 0 for row in rows)
    check_png(tmp_path / "cpu_inference.png")
    fake = [
        {"variant": "retnet-onnx-int8", "context": 256, "x fastest llama.cpp": 1.5, "fastest llama.cpp": "q4"},
        {"variant": "retnet-onnx-int4", "context": 32768, "x fastest llama.cpp": 12.0, "fastest llama.cpp": "q4"},
    ]
    assert cpu_inference.goals(fake) == [
        "context 256: best quantized RetNet path retnet-onnx-int8 at 1.50x q4 (goal 1x): met",
        "context 32768: best quantized RetNet path retnet-onnx-int4 at 12.00x q4 (goal 20x): not met",
    ]


def test_bench_quantized_quality_quick(tmp_path):
    """The quality benchmark end to end on a tiny random model: one row per scheme, float32 agreeing with itself."""
    pytest.importorskip("onnxruntime", reason="the onnx extra")
    from benchmarks import quantized_quality

    argv = ["--quick", "--work", str(tmp_path / "models"), "--out", str(tmp_path), "--threads", "1"]
    assert quantized_quality.main(argv) == 0
    rows = json.loads((tmp_path / "quantized_quality.json").read_text())
    assert [row["scheme"] for row in rows] == ["fp32", "int8", "int4"]
    fp32 = rows[0]
    assert fp32["vs fp32"] == "+0.00%" and fp32["top-1 agreement (teacher-forced)"] == "100.0%"
    assert fp32["max logit difference / scale"] == 0.0
    assert all(1 < row["held-out perplexity"] < 64 * 4 for row in rows)  # a random 64-token model: about 64
