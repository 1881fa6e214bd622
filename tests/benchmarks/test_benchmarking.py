"""The benchmarks (benchmarks/): correctness only, no timing is asserted.

- `same_size_llama` lands within 3% of RetNet's parameter count (counted on real modules), and refuses when it
  cannot;
- `PeakMemory` sees a large allocation and does not invent one;
- each script's `--quick` mode runs end to end (through its `main`), prints a table with its columns and writes a
  PNG; torchscale's and ours' logits agree in that run.
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks import common, decode, prefill, torchscale
from retnet_hf import RetNetConfig, RetNetForCausalLM

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
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0 and float(row[6]) > 0  # ms/step, tokens/s, ideal
    check_png(tmp_path / "decode.png")
    saved = json.loads((tmp_path / "decode.json").read_text())
    # the state does not grow with the context; the KV cache doubles from 32 to 64 tokens
    cache = {(row["model"], row["context"]): row["cache MB"] for row in saved if row["batch"] == 1}
    assert cache[("RetNet", 32)] == cache[("RetNet", 64)]
    assert math.isclose(cache[("Llama", 64)], 2 * cache[("Llama", 32)])


def test_bench_prefill_quick(tmp_path, capsys):
    script = prefill
    assert script.main(["--quick", "--out", str(tmp_path), "--bandwidth-mb", "16"]) == 0
    output = capsys.readouterr().out
    assert "CPU:" in output and "measured read bandwidth" in output
    rows = table_rows(output, script.COLUMNS)
    assert len(rows) == 3 * 2 * 2  # variants x lengths x modes
    assert {row[0] for row in rows} == set(prefill.PREFILL_VARIANTS)
    assert {row[3] for row in rows} == {"forward", "forward+backward"}
    assert all(float(row[4]) > 0 for row in rows)
    assert "chunkwise (chunk 32)" in output
    check_png(tmp_path / "prefill.png")
    # the tensor peak is exact and sees the training step's activations and logits
    peaks = {(row[0], row[3]): float(row[6]) for row in rows if row[1] == "128"}
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

    if not Path(script.DEFAULT_DATA).is_file():
        pytest.skip(f"{script.DEFAULT_DATA} is not there")
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
