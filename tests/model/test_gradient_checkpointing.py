"""Gradient checkpointing gives the same gradients, reentrant or not, tied or not, under both method names."""

import pytest
import torch

from retnet_hf import RetNetForCausalLM

from conftest import (
    cache_of,
    random_ids,
    tiny_model,
)


# --------------------------------------------------------------------------------------------------------------
# gradient checkpointing
# --------------------------------------------------------------------------------------------------------------
def parameter_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    output = model(ids, labels=labels)
    output.loss.backward()
    return output.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "method, use_reentrant, tied",
    [
        ("gradient_checkpointing_enable", False, False),
        ("gradient_checkpointing_enable", True, False),
        ("gradient_checkpointing_enable", False, True),
        ("activation_checkpointing_enable", None, False),
    ],  # the name transformers 5.x prefers (absent from 4.x)
    ids=["non_reentrant", "reentrant", "non_reentrant_tied", "activation_checkpointing_enable"],
)
def test_gradient_checkpointing_same_gradients(method, use_reentrant, tied):
    if not hasattr(RetNetForCausalLM, method):
        pytest.skip(f"this transformers has no {method}")
    model = tiny_model(torch.float64, decoder_layers=3, share_decoder_input_output_embed=tied).train()
    assert model.config.dropout == 0 and model.config.activation_dropout == 0
    ids = random_ids(length=20)  # longer than a chunk (8): the chunkwise form
    labels = ids.clone()
    labels[0, :3] = -100

    # calls of each layer's retention (module hooks do not fire in torch's non-reentrant recomputation, and the
    # checkpointed layer recomputes its class's forward, so the count is taken one module down)
    calls = []
    for layer in model.model.layers:

        def counted_forward(*args, _forward=layer.retention.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)

        layer.retention.forward = counted_forward
    loss, expected = parameter_grads(model, ids, labels)
    plain_calls = len(calls)
    assert plain_calls == 3

    if use_reentrant is None:
        getattr(model, method)()
    else:
        getattr(model, method)(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.model.gradient_checkpointing
    calls.clear()
    checkpointed_loss, grads = parameter_grads(model, ids, labels)
    assert len(calls) == 2 * plain_calls, "each layer should run again in the backward pass"

    assert torch.equal(checkpointed_loss, loss) or abs(float(checkpointed_loss - loss)) < 1e-12
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(grads[name], grad, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")

    # a cache is not kept while checkpointing in training; generation still works after disabling it
    assert cache_of(model(ids, use_cache=True)) is None
    getattr(model, method.replace("enable", "disable"))()
    assert not model.model.gradient_checkpointing
    model.eval()
    with torch.no_grad():
        assert model.generate(ids[:, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (2, 8)
