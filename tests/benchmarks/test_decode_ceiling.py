"""The decode benchmark: its ceiling (both bandwidth probes, and the bytes a step must read and write), its rounds
(RetNet and Llama, generate() and the step loop timed side by side; a scripted clock gives the figures) and its
memory guard (both models' caches counted together)."""

import math
import statistics

from benchmarks import common, decode


def test_read_bandwidth_probes_and_their_best():
    probes = common.measure_read_bandwidth(size_mb=4, repeats=2)
    assert set(probes) == {"mv", "vm", "sum", "best"}
    assert all(value > 0 for value in probes.values())
    assert probes["best"] == max(probes["mv"], probes["vm"], probes["sum"])


def test_ceiling_counts_weights_and_the_state_read_and_written():
    retnet, llama = common.build_models(common.size_config("tiny"))
    rows = decode.decode_benchmark(
        retnet, llama, [8], [2], new_tokens=2, bandwidths={"read": 10.0, "sum": 5.0}, paths=("step",)
    )
    by_model = {row["model"]: row for row in rows}
    state = common.retnet_state_bytes(retnet.config, 2)
    expected = 2 * 10e9 / (common.weight_bytes_per_token(retnet) + 2 * state)
    assert math.isclose(by_model["RetNet"]["ideal tokens/s"], expected)
    kv = common.llama_kv_bytes(llama.config, 8, 2) + common.llama_kv_bytes(llama.config, 1, 2)
    expected = 2 * 10e9 / (common.weight_bytes_per_token(llama) + kv)
    assert math.isclose(by_model["Llama"]["ideal tokens/s"], expected)
    for row in rows:  # the x.sum() probe, half as fast here, doubles the share of the ceiling
        assert math.isclose(row["% sum ceiling"], 2 * row["% ceiling"])
    lines = decode.decode_summary(rows)
    assert any("of the ceiling" in line and "x.sum() probe" in line for line in lines)


def test_rounds_interleave_models_and_paths_and_ratios_are_paired(monkeypatch):
    retnet, llama = common.build_models(common.size_config("tiny"))
    names = {id(retnet): "RetNet", id(llama): "Llama"}
    # per-step seconds by (model, path), one per round, where the median of the per-round ratios and the ratio of
    # the medians differ: Llama / RetNet step 2, 1.5, 2.5 (ratio of medians 2.5); RetNet generate / step 1.1, 1.2,
    # 1.0 (1.0); Llama generate / step 1.1, 1.0, 1.2 (1.2); Llama / RetNet generate 2, 1.25, 3 (3)
    scripted = {
        ("RetNet", "step"): [1.0, 4.0, 2.0],
        ("Llama", "step"): [2.0, 6.0, 5.0],
        ("RetNet", "generate"): [1.1, 4.8, 2.0],
        ("Llama", "generate"): [2.2, 6.0, 6.0],
    }
    calls = []

    def scripted_run(path, real):
        """`real`, run (for its work on the cache and for the memory pass), returning the scripted figure of its
        round (0 for a warm-up or the memory pass, whose figures are not used)."""

        def run(model, *args, **kwargs):
            real(model, *args, **kwargs)
            new_tokens = args[2]  # (first or ids, fresh cache, new tokens)
            calls.append((names[id(model)], path, new_tokens))
            index = calls.count(calls[-1]) - 1
            return scripted[(names[id(model)], path)][index] if new_tokens == 3 and index < 3 else 0.0

        return run

    monkeypatch.setattr(decode, "_step_seconds_per_token", scripted_run("step", decode._step_seconds_per_token))
    monkeypatch.setattr(
        decode, "_generate_seconds_per_token", scripted_run("generate", decode._generate_seconds_per_token)
    )
    rows = decode.decode_benchmark(retnet, llama, [8], [2], new_tokens=3, rounds=3)
    keys = [("RetNet", "generate"), ("Llama", "generate"), ("RetNet", "step"), ("Llama", "step")]
    warm_up = [key + (decode.WARM_UP_TOKENS,) for key in keys]
    rounds = [key + (3,) for start in range(3) for key in keys[start:] + keys[:start]]
    memory = [("RetNet", "step", 3), ("Llama", "step", 3)]
    assert calls == warm_up + rounds + memory
    by_key = {(row["model"], row["path"]): row for row in rows}
    assert list(by_key) == [("RetNet", "generate"), ("RetNet", "step"), ("Llama", "generate"), ("Llama", "step")]
    for key, figures in scripted.items():
        row = by_key[key]
        assert row["ms/step by round"] == [1e3 * value for value in figures]
        assert math.isclose(row["ms/step"], 1e3 * statistics.median(figures))
        assert math.isclose(row["tokens/s"], 2 / statistics.median(figures))
        assert row["decode MB"] > row["cache MB"] > 0
    assert math.isclose(by_key[("RetNet", "step")]["x Llama tokens/s"], 2.0)
    assert math.isclose(by_key[("RetNet", "generate")]["x Llama tokens/s"], 2.0)
    assert by_key[("Llama", "step")]["x Llama tokens/s"] is None
    assert math.isclose(by_key[("RetNet", "generate")]["x step time"], 1.1)
    assert math.isclose(by_key[("Llama", "generate")]["x step time"], 1.1)
    assert by_key[("RetNet", "step")]["x step time"] is None
    lines = decode.decode_summary(rows)
    assert "context 8 batch 2 step: RetNet/Llama tokens/s = 2.00x, paired per round (goal: >= 1.0x)" in lines
    assert any(
        line.startswith("RetNet context 8 batch 2: generate() per token is +10.0% vs the step loop, paired")
        for line in lines
    )


def test_memory_guard_counts_both_models_caches_together(monkeypatch):
    retnet, llama = common.build_models(common.size_config("tiny"))
    ours, theirs = (decode.decode_bytes_needed(model, 8, 2, 2) for model in (retnet, llama))
    # either alone would fit, the two together do not: RetNet (admitted first) is timed alone
    available = 2 * (max(ours, theirs) + min(ours, theirs) / 2)
    monkeypatch.setattr(decode, "available_memory_bytes", lambda device: available)
    rows = decode.decode_benchmark(retnet, llama, [8], [2], new_tokens=2, rounds=2, memory_fraction=0.5)
    by_key = {(row["model"], row["path"]): row for row in rows}
    assert len(rows) == 4
    for path in ("generate", "step"):
        assert by_key[("RetNet", path)]["skipped"] is None
        assert by_key[("RetNet", path)]["x Llama tokens/s"] is None and by_key[("RetNet", path)]["ms/step"] > 0
        assert by_key[("Llama", path)]["skipped"] == f"needs ~{(ours + theirs) / common.GB:.1f} GiB with RetNet's cache"
    # RetNet's count: the batch's state, a run's copy of it and the batch-1 prefill's
    assert math.isclose(ours, common.retnet_state_bytes(retnet.config, 2) * 2.5)
