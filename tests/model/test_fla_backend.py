"""`RetNetConfig.retention_backend`: flash-linear-attention's kernels (`fla_retention.py`) or PyTorch
(`retention.py`), chosen per call, with a logged reason whenever fla was asked for and torch runs instead.

fla's kernels themselves run in `fla_backend_cases.py`, in a child process with Triton's interpreter."""

import logging
from pathlib import Path

import pytest
import torch

from retnet_hf import RetNetConfig, RetNetForCausalLM
from retnet_hf.model import fla_retention

from conftest import random_ids, run_interpreted, tiny_config, tiny_model


@pytest.fixture
def fallbacks(caplog):
    """The log lines of this test that say retention runs in PyTorch although fla was asked for."""
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: each message once per process
    caplog.set_level(logging.WARNING, logger="retnet_hf")
    yield lambda: [r.getMessage() for r in caplog.records if "runs retention in PyTorch" in r.getMessage()]
    logging.Logger.warning_once.cache_clear()


def test_fla_kernels_equal_torch_through_the_triton_interpreter(tmp_path):
    """Every form, float32 and float16, forward and backward (prefill, one-token steps, a state handed over, left
    padding, packed documents), and the whole model's logits, cached steps, generate() tokens and gradients."""
    run_interpreted(Path(__file__).with_name("fla_backend_cases.py"), tmp_path)


def test_backend_is_a_checked_config_field_that_travels(tmp_path):
    assert RetNetConfig().retention_backend == "auto"
    with pytest.raises(ValueError, match="retention_backend must be one of auto, torch, fla, got 'triton'"):
        tiny_config(retention_backend="triton")
    tiny_model(retention_backend="fla").save_pretrained(tmp_path)
    assert RetNetForCausalLM.from_pretrained(tmp_path).config.retention_backend == "fla"


def test_auto_on_a_cpu_is_torch_without_a_word(fallbacks, monkeypatch):
    calls = []
    monkeypatch.setattr(fla_retention, "_retention", lambda *args: calls.append(args))
    model = tiny_model()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_model(retention_backend="torch")(ids).logits)
    assert calls == [] and fallbacks() == []


def test_fla_without_a_cuda_device_falls_back_with_one_log_line(fallbacks, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fla_retention, "fla_kernels", lambda: object())  # installed, whether or not it is here
    model, reference = tiny_model(retention_backend="fla"), tiny_model(retention_backend="torch")
    ids = random_ids()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert fallbacks() == [
        "RetNet: retention_backend='fla', but this call runs retention in PyTorch (retention_backend='torch'): "
        "the model is on cpu, and fla's Triton kernels need a CUDA device."
    ]


@pytest.mark.parametrize(
    "case, reason",
    [
        ("not installed", "flash-linear-attention is not installed (pip install flash-linear-attention)"),
        ("float64", "fla's kernels take float32, float16 or bfloat16, and the model is in torch.float64"),
        ("parallel with a state", "fla's parallel kernel takes and returns no state (use retention_form='chunkwise')"),
    ],
)
def test_what_fla_cannot_compute_is_computed_by_torch_and_said(case, reason, fallbacks, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as if the kernels could run here: only the case stops them
    monkeypatch.setattr(fla_retention, "fla_kernels", lambda: None if case == "not installed" else object())
    dtype = torch.float64 if case == "float64" else torch.float32
    model = tiny_model(dtype, retention_backend="fla")
    reference = tiny_model(dtype, retention_backend="torch")
    ids = random_ids()
    form = "parallel" if case == "parallel with a state" else None
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, retention_form=form).logits, reference(ids, retention_form=form).logits, rtol=0, atol=0
        )
    assert [line.rsplit(": ", 1)[-1] for line in fallbacks()] == [reason + "."]
