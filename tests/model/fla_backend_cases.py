"""The fla backend (`retnet_hf/model/fla_retention.py`) against the torch backend (`retention.py`), with
flash-linear-attention's Triton kernels interpreted on the CPU.

Run only in a child process by `test_fla_backend.py` (through `conftest.run_interpreted`, with the plugin
tests/fla_interpreter.py loaded before triton): not a `test_*` file, so the main run does not collect it.

The reference is the torch form in float64 on the same inputs (half-precision inputs upcast after rounding), so
the tolerances measure fla alone: float32 to 1e-5 relative, float16 to 2e-3 (its outputs are rounded to float16;
fla accumulates in float32). The interpreter is wrong in float64 and bfloat16 matrix products, so neither is run.
"""

import pytest
import torch

from retnet_hf.model import fla_retention
from retnet_hf.model.fla_retention import FLA_RETENTION_FUNCTIONS
from retnet_hf.model.retention import RETENTION_FUNCTIONS

from conftest import cache_of, random_ids, relative_difference, tiny_model


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
B, H, T, DK, DV = 2, 2, 19, 16, 8
LOG_DECAY = torch.log(1 - 2 ** (-5.0 - torch.arange(H, dtype=torch.float32)))


def scenario(name: str, length: int = T):
    """Keyword arguments of a form for the named case: what state comes in, which tokens are padding, where
    documents start."""
    g = torch.Generator().manual_seed(1)
    state = (torch.randn(B, H, DK, DV, generator=g) * 0.3, torch.tensor([[3.0, 7.0], [0.0, 12.0]]))
    left_padding = torch.ones(B, length, dtype=torch.bool)
    left_padding[1, :4] = False
    resets = torch.zeros(B, length, dtype=torch.bool)
    resets[0, 7] = resets[1, 0] = resets[1, 12] = True
    return {
        "prefill": {},
        "state handed over": dict(initial_state=state),
        "left padding": dict(valid=left_padding),
        "left padding after a state": dict(valid=left_padding, initial_state=state),
        "packed documents": dict(resets=resets, initial_state=state),
        "packed and padded": dict(resets=resets, valid=left_padding),
    }[name]


SCENARIOS = (
    "prefill",
    "state handed over",
    "left padding",
    "left padding after a state",
    "packed documents",
    "packed and padded",
)


def inputs(dtype, length=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, d, generator=g).to(dtype) for d in (DK, DK, DV)]


# every form in every scenario, but the parallel form with an incoming state: fla's parallel kernel carries none,
# and the model computes those calls in torch (test_fla_backend.py checks that choice)
CASES = [
    (form, name)
    for form in ("chunkwise", "recurrent", "parallel")
    for name in SCENARIOS
    if not (form == "parallel" and "initial_state" in scenario(name))
]


def run(functions, form, q, k, v, kwargs, dtype, normalize):
    """The form's output, final state and gradients (of q, k, v and the incoming state) in `dtype`."""
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    kwargs = dict(kwargs)
    leaves = [q, k, v]
    if "initial_state" in kwargs:
        s, scale = kwargs["initial_state"]
        s = s.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        kwargs["initial_state"] = (s, scale.to(s.dtype))
        leaves.append(s)
    if form == "chunkwise" and functions is RETENTION_FUNCTIONS:
        kwargs["chunk_size"] = 8
    with_state = form != "parallel"
    out, state = functions[form](
        q, k, v, log_decay=LOG_DECAY, output_final_state=with_state, normalize=normalize, **kwargs
    )
    g = torch.Generator().manual_seed(2)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    if with_state:
        loss = loss + (state[0].double() * torch.randn(state[0].shape, generator=g, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), None if state is None else tuple(x.detach() for x in state), grads


@pytest.mark.parametrize("normalize", [True, False], ids=["torchscale normalised", "unnormalised"])
@pytest.mark.parametrize("form, name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_form_forward_and_backward_equal_torch(dtype, form, name, normalize):
    q, k, v = inputs(dtype)
    kwargs = scenario(name)
    out, state, grads = run(FLA_RETENTION_FUNCTIONS, form, q, k, v, kwargs, dtype, normalize)
    ref_out, ref_state, ref_grads = run(RETENTION_FUNCTIONS, form, q, k, v, kwargs, torch.float64, normalize)
    tolerance = TOLERANCE[dtype]
    assert out.dtype in (dtype, torch.float32)  # float32 after the division by the scale
    assert relative_difference(out.double(), ref_out) < tolerance
    if state is not None:
        assert state[0].dtype == state[1].dtype == torch.float32  # the cache keeps float32 states
        assert relative_difference(state[0].double(), ref_state[0]) < tolerance
        assert relative_difference(state[1].double(), ref_state[1]) < 1e-6
    for grad, ref in zip(grads, ref_grads):
        assert relative_difference(grad.double(), ref) < tolerance * 2


@pytest.mark.parametrize("form", ["chunkwise", "recurrent"])
def test_float16_normalised_outputs_do_not_overflow(form):
    """Unnormalised, these outputs are sums of about 40 terms of 2,000 (80,000 > float16's 65,504); fla computes
    the normalised ones directly (queries divided by sqrt(scale_n)), which are in range."""
    length = 64
    q = torch.zeros(1, H, length, DK)
    q[..., 0] = 20**0.5
    k, v = q.clone(), torch.full((1, H, length, DV), 100.0)
    out, _ = FLA_RETENTION_FUNCTIONS[form](*(x.half() for x in (q, k, v)), log_decay=LOG_DECAY)
    ref, _ = RETENTION_FUNCTIONS["recurrent"](q.double(), k.double(), v.double(), log_decay=LOG_DECAY, normalize=False)
    assert ref.abs().max() > 65504  # what an unnormalised float16 output would have overflowed
    ref, _ = RETENTION_FUNCTIONS["recurrent"](q.double(), k.double(), v.double(), log_decay=LOG_DECAY)
    assert torch.isfinite(out).all() and relative_difference(out.double(), ref) < TOLERANCE[torch.float16]


def test_one_token_steps_carry_the_state_as_torch_does():
    """Decoding: token by token through the recurrent kernel, each step's state the next step's input."""
    q, k, v = inputs(torch.float32)
    state = ref_state = None
    for t in range(6):
        token = [x[:, :, t : t + 1] for x in (q, k, v)]
        out, state = FLA_RETENTION_FUNCTIONS["recurrent"](*token, log_decay=LOG_DECAY, initial_state=state)
        ref, ref_state = RETENTION_FUNCTIONS["recurrent"](
            *(x.double() for x in token), log_decay=LOG_DECAY, initial_state=ref_state
        )
        assert relative_difference(out.double(), ref) < 1e-5
    assert relative_difference(state[0].double(), ref_state[0]) < 1e-5


def test_documents_are_cut_where_rows_and_resets_start():
    resets = torch.tensor([[False, False, True, False], [True, False, False, True]])
    cu_seqlens, first, last = fla_retention._documents(resets)
    assert cu_seqlens.tolist() == [0, 2, 4, 7, 8]
    assert first.tolist() == [0, 2] and last.tolist() == [1, 3]


# ------------------------------------------------------------------------------------------------- the model


@pytest.fixture
def fla_calls(monkeypatch):
    """The number of retention calls the fla backend made (the model must not fall back to torch silently)."""
    calls = []
    original = fla_retention._retention

    def counted(kernel, *args):
        calls.append(kernel)
        return original(kernel, *args)

    monkeypatch.setattr(fla_retention, "_retention", counted)
    return calls


def pair(dtype=torch.float32, **overrides):
    """The same tiny model twice, with the torch and the fla backend."""
    torch_model = tiny_model(dtype, retention_backend="torch", **overrides)
    fla_model = tiny_model(dtype, retention_backend="fla", **overrides)
    fla_model.load_state_dict(torch_model.state_dict())
    return torch_model, fla_model


@pytest.mark.parametrize("form", ["parallel", "chunkwise"])
def test_model_logits_with_left_padding_equal_torch(form, fla_calls):
    torch_model, fla_model = pair()
    ids = random_ids(length=70)  # two of fla's chunks of 64
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = torch_model(ids, attention_mask=mask, retention_form=form, use_cache=False).logits
        out = fla_model(ids, attention_mask=mask, retention_form=form, use_cache=False).logits
    assert len(fla_calls) == torch_model.config.decoder_layers
    assert relative_difference(out, ref) < 1e-5


def test_model_cached_steps_and_generate_equal_torch(fla_calls):
    torch_model, fla_model = pair()
    ids = random_ids(length=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = torch_model(ids, attention_mask=mask)
        out = fla_model(ids, attention_mask=mask)
        assert relative_difference(out.logits, ref.logits) < 1e-5
        step = ids[:, :1]
        mask = torch.cat((mask, torch.ones_like(step)), dim=1)
        ref_step = torch_model(step, attention_mask=mask, cache=cache_of(ref)).logits
        out_step = fla_model(step, attention_mask=mask, cache=cache_of(out)).logits
        assert relative_difference(out_step, ref_step) < 1e-5
    kinds = {kernel.__name__ for kernel in fla_calls}
    assert kinds == {"chunk_simple_gla", "fused_recurrent_simple_gla"}
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = dict(input_ids=ids, attention_mask=mask[:, :-1])
    assert torch.equal(fla_model.generate(**prompt, **settings), torch_model.generate(**prompt, **settings))


def test_model_packed_documents_and_training_gradients_equal_torch(fla_calls):
    torch_model, fla_model = pair()
    ids = random_ids(batch=1, length=20)
    position_ids = torch.cat((torch.arange(7), torch.arange(13)))[None]
    losses = []
    for model in (torch_model, fla_model):
        model.train()
        loss = model(ids, position_ids=position_ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert fla_calls, "the fla backend did not run"
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    for (name, p), q in zip(torch_model.named_parameters(), fla_model.parameters()):
        assert relative_difference(q.grad, p.grad) < 1e-4, name


def test_half_precision_model_runs_the_kernels_in_half_precision(fla_calls, monkeypatch):
    torch_model, fla_model = pair(torch.float16)
    seen = []
    original = fla_retention.fla_kernels().chunk_simple_gla

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return original(q, *args, **kwargs)

    monkeypatch.setattr(fla_retention.fla_kernels(), "chunk_simple_gla", spy)
    ids = random_ids(length=12)
    with torch.no_grad():
        ref = torch_model(ids).logits
        out = fla_model(ids).logits
    assert torch.float16 in seen  # the model's q, k, v (the scale's call is float32)
    assert torch.isfinite(out).all()
    assert relative_difference(out.float(), ref.float()) < 1e-2
