"""`retnet-hf train` under the launchers users already have: two CPU processes on the gloo backend.

DDP through `accelerate launch`, FSDP (FSDP2, a `RetNetDecoderLayer` per unit) through `torchrun`. A small driver
runs the real command line in each process with one observing callback added: a forward pre-hook records the
input ids the model actually received on that rank while training, and at the end of training each rank saves its
full weights (FSDP gathers its shards for this). The test then checks that the ranks saw disjoint data and ended
with identical weights that differ from the initial ones and equal the saved model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retnet_hf.sample_data import SHAKESPEARE_TRAIN

from conftest import REPO_ROOT


SHAKESPEARE = SHAKESPEARE_TRAIN

STEPS, BATCH, BLOCK = 6, 4, 32

DRIVER = r'''
import json, os, sys, types
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

import retnet_hf.pretraining as pretraining
from retnet_hf.cli import main

record_dir = Path(sys.argv[1])


def full_state(model):
    state = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole tensor
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().clone().cpu()
    return state


class Record(TrainerCallback):
    """Observes only: the ids each training forward receives on this rank, and the weights before and after."""

    def __init__(self):
        self.batches = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = full_state(model)

        def hook(module, positional, keywords):
            if module.training:
                ids = keywords["input_ids"] if "input_ids" in keywords else positional[0]
                self.batches.extend(ids.tolist())

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        rank = dist.get_rank()
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        torch.save({"initial": self.initial, "final": full_state(model)}, record_dir / f"weights{rank}.pt")
        (record_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank,
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "batches": self.batches,
            "local_parameters": local,
            "parameters": sum(p.shape.numel() for p in model.parameters()),  # a DTensor's shape is the full one
            "fsdp_units": [name for name, m in model.named_modules() if isinstance(m, FSDPModule)],
            "fsdp_unit_classes": sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)}),
        }))


if os.environ.get("FREEZE_CLOCK_ON_RANK") == os.environ["RANK"]:  # this rank's clock stands still
    pretraining.time = types.SimpleNamespace(monotonic=lambda: 0.0)

original = pretraining.pretrain
pretraining.pretrain = lambda *args, **kwargs: original(*args, callbacks=[Record()], **kwargs)
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:20_000])
    return path


def launch(launcher, tmp_path, text_file, *extra, env_extra=None, timeout=240):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "model"
    train = [
        "train",
        str(text_file),
        "--output",
        str(out),
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--block-size",
        str(BLOCK),
        "--batch-size",
        str(BATCH),
        "--max-steps",
        str(STEPS),
        "--eval-steps",
        "3",
        "--save-steps",
        "3",
        "--lr",
        "3e-3",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    if launcher == "accelerate":
        command = [
            str(Path(sys.executable).parent / "accelerate"),  # this interpreter's, whether its venv is active or not
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29531",
            str(driver),
            str(records),
            *train,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(driver),
            str(records),
            *train,
        ]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(records / f"weights{r}.pt") for r in range(2)]
    return out, ranks, weights, run


def check_data_parallel_training(out, ranks, weights):
    from safetensors.torch import load_file

    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["backend"] == "gloo" for r in ranks)
    # each rank trained on its own share of the data: STEPS x BATCH distinct blocks, none seen by the other rank
    seen = [{tuple(block) for block in r["batches"]} for r in ranks]
    for r, blocks in zip(ranks, seen):
        assert len(r["batches"]) == STEPS * BATCH and all(len(b) == BLOCK for b in r["batches"])
        assert len(blocks) == STEPS * BATCH
    assert not seen[0] & seen[1]
    # ... and both ended with the same weights, which moved away from the (common) initial ones
    initial0, final0 = weights[0]["initial"], weights[0]["final"]
    for name, tensor in final0.items():
        assert torch.equal(weights[1]["initial"][name], initial0[name]), name
        assert torch.equal(weights[1]["final"][name], tensor), name
    assert any(not torch.equal(final0[name], initial0[name]) for name in final0)
    # the saved model is those weights, and the folder is complete
    saved = load_file(out / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, final0[name]), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["eval_loss"] < torch.log(torch.tensor(300.0)).item()


def test_ddp_two_cpu_processes_with_accelerate_launch(tmp_path, text_file):
    out, ranks, weights, run = launch("accelerate", tmp_path, text_file)
    check_data_parallel_training(out, ranks, weights)
    assert all(r["fsdp_units"] == [] for r in ranks)
    assert all(r["local_parameters"] == r["parameters"] for r in ranks)  # DDP: each rank holds every weight
    assert run.stdout.count("trained 6 steps") == 1  # only the main process reports


def test_fsdp_on_cpu_processes_says_it_needs_gpus(tmp_path, text_file):
    """accelerate 1.15 sets FSDP up only for multi-GPU/accelerator runs: for MULTI_CPU its AcceleratorState ignores
    the FSDP plugin that Trainer passes and trains DDP. `--fsdp` on CPU therefore stops with a clear message
    instead of silently training without sharding (a GPU run wraps each RetNetDecoderLayer, see pretraining.py)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    (tmp_path / "records").mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(driver),
        str(tmp_path / "records"),
        "train",
        str(text_file),
        "--output",
        str(tmp_path / "model"),
        "--vocab-size",
        "300",
        "--block-size",
        str(BLOCK),
        "--max-steps",
        "2",
        "--fsdp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "retnet-hf train: error: --fsdp needs GPUs" in run.stderr
    assert "pretraining.py" not in run.stderr  # the ranks print the message, not a traceback (torchrun's own
    # report of the failed ranks follows it)
    assert not (tmp_path / "model" / "model.safetensors").exists()


def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path, text_file):
    """`--max-seconds` under torchrun: rank 0's clock decides, so no rank waits forever for a step the other
    skipped. Rank 1's clock is frozen (it would never stop by itself); a budget of 1 ms on rank 0 stops both after
    their first step, with the same weights. If each rank decided alone, rank 1 would hang in its second step."""
    out, ranks, weights, run = launch(
        "torchrun", tmp_path, text_file, "--max-seconds", "0.001", env_extra={"FREEZE_CLOCK_ON_RANK": "1"}, timeout=150
    )
    assert [len(r["batches"]) for r in ranks] == [BATCH, BATCH]
    assert not {tuple(b) for b in ranks[0]["batches"]} & {tuple(b) for b in ranks[1]["batches"]}
    for name, tensor in weights[0]["final"].items():
        assert torch.equal(weights[1]["final"][name], tensor), name
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 1
