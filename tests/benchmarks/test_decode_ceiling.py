"""The decode benchmark's ceiling: both bandwidth probes, and the bytes a step must read and write."""

import math

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
