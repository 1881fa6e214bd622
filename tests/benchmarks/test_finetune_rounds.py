"""benchmarks.finetune's rounds: the rows merged from the rounds (the order they run in is
`common.interleaved_timings`', tested in test_benchmarking.py)."""

import pytest

from benchmarks import finetune


def run(model, method="lora", length=512, steps_per_second=None, memory=100.0):
    row = {"model": model, "method": method, "max length": length}
    if steps_per_second is None:
        return {**row, "skipped": "no backend"}
    return {
        **row,
        "steps/s": steps_per_second,
        "tokens/s": 500 * steps_per_second,
        "peak memory MB": memory,
        "step seconds": [1 / steps_per_second],
        "timed steps": 1,
    }


def test_the_ratio_is_the_median_of_the_ratios_within_rounds():
    # the machine is twice as fast in round 2: the medians of steps/s mix the rounds, the ratio does not
    rounds = [
        [run("RetNet", steps_per_second=0.9, memory=90.0), run("Llama", steps_per_second=1.0)],
        [run("RetNet", steps_per_second=2.2, memory=95.0), run("Llama", steps_per_second=2.0, memory=110.0)],
        [run("RetNet", steps_per_second=1.05), run("Llama", steps_per_second=1.0)],
    ]
    retnet, llama = finetune.merge_rounds(rounds)
    assert retnet["steps/s"] == pytest.approx(1.05) and llama["steps/s"] == pytest.approx(1.0)
    assert retnet["round steps/s"] == [0.9, 2.2, 1.05] and retnet["timed steps"] == 3
    assert retnet["RetNet/Llama steps/s"] == "1.05x"  # median of 0.9, 1.1, 1.05
    assert retnet["RetNet/Llama memory"] == f"{100.0 / 110.0:.2f}x"  # the largest peaks
    assert "RetNet/Llama steps/s" not in llama


def test_a_configuration_skipped_in_every_round_keeps_its_reason_and_one_round_of_numbers_is_enough():
    rounds = [
        [run("RetNet", "qlora"), run("Llama", "qlora"), run("RetNet", steps_per_second=1.0), run("Llama")],
        [run("RetNet", "qlora"), run("Llama", "qlora"), run("RetNet"), run("Llama", steps_per_second=2.0)],
    ]
    qlora_retnet, qlora_llama, retnet, llama = finetune.merge_rounds(rounds)
    assert qlora_retnet["skipped"] == qlora_llama["skipped"] == "no backend"
    assert retnet["steps/s"] == 1.0 and llama["steps/s"] == 2.0
    assert "RetNet/Llama steps/s" not in retnet  # never measured in the same round


def test_the_run_times_each_configurations_two_models_back_to_back_in_rounds(tmp_path, monkeypatch):
    """main's wiring: per (length, method), the rounds of its two models one after the other, the first alternating;
    the table's ratio comes from the rounds (the processes are replaced by scripted rows)."""
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    calls = []
    speeds = {"RetNet": iter([1.0, 4.0, 1.0, 4.0]), "Llama": iter([2.0, 5.0, 2.0, 5.0])}  # drift after round 1

    def scripted(run_settings, timeout):
        row = run_settings["row"]
        calls.append((row["model"], row["method"]))
        return run(row["model"], row["method"], row["max length"], steps_per_second=next(speeds[row["model"]]))

    monkeypatch.setattr(finetune, "run_in_process", scripted)
    out = tmp_path / "out"
    assert finetune.main(["--quick", "--rounds", "2", "--out", str(out), "--bandwidth-mb", "16"]) == 0
    assert calls == [
        ("RetNet", "lora"), ("Llama", "lora"), ("Llama", "lora"), ("RetNet", "lora"),
        ("RetNet", "qlora"), ("Llama", "qlora"), ("Llama", "qlora"), ("RetNet", "qlora"),
    ]  # fmt: skip
    rows = {(row["model"], row["method"]): row for row in finetune.json.loads((out / "finetune.json").read_text())}
    assert rows[("RetNet", "lora")]["round steps/s"] == [1.0, 4.0]
    assert rows[("RetNet", "lora")]["RetNet/Llama steps/s"] == f"{(0.5 + 0.8) / 2:.2f}x"
