"""The model: forms agree end to end, standard outputs, heads, configuration checks and input errors."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from retnet_hf import (
    RetNetCache,
    RetNetConfig,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetModel,
)

from conftest import cache_of, random_ids, tiny_config, tiny_model


FORMS = ["parallel", "chunkwise", "recurrent"]


def tokens(batch=2, length=19, seed=1, vocab=64):
    return random_ids(batch, length, seed, vocab)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_forms_give_the_same_logits_and_states(dtype, tol, chunk_size):
    model = tiny_model(dtype, recurrent_chunk_size=chunk_size)
    x = tokens()
    outputs = {form: model(x, retention_form=form, use_cache=True) for form in FORMS}
    ref = outputs["parallel"]
    for form in ("chunkwise", "recurrent"):
        torch.testing.assert_close(outputs[form].logits, ref.logits, rtol=tol, atol=tol)
        for (s, scale), (ref_s, ref_scale) in zip(cache_of(outputs[form]).states, cache_of(ref).states):
            torch.testing.assert_close(s, ref_s, rtol=tol, atol=tol)
            torch.testing.assert_close(scale, ref_scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("first", FORMS)
@pytest.mark.parametrize("second", FORMS)
def test_prefill_in_one_form_continue_in_another(first, second):
    model = tiny_model(torch.float64, recurrent_chunk_size=4)
    x = tokens(length=17)
    ref = model(x, retention_form="parallel").logits
    head = model(x[:, :7], retention_form=first, use_cache=True)
    tail = model(x[:, 7:], retention_form=second, cache=cache_of(head), use_cache=True)
    torch.testing.assert_close(torch.cat([head.logits, tail.logits], dim=1), ref, rtol=1e-10, atol=1e-10)
    assert cache_of(tail).get_seq_length() == 17


def test_auto_form_choice_is_exact():
    """The default form (chunkwise for many tokens, recurrent for one) equals the parallel form."""
    model = tiny_model(torch.float64, recurrent_chunk_size=4)
    x = tokens(length=13)
    ref = model(x, retention_form="parallel").logits
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-10, atol=1e-10)
    cache = None
    steps = []
    for t in range(x.shape[1]):
        out = model(x[:, t : t + 1], cache=cache, use_cache=True)
        cache = cache_of(out)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref, rtol=1e-10, atol=1e-10)


def test_config_field_chooses_the_form(monkeypatch):
    model = tiny_model(torch.float64, retention_form="recurrent", recurrent_chunk_size=4)
    x = tokens(length=9)
    calls = []
    for layer in model.model.layers:
        functions = layer.retention.retention_functions["torch"]
        for form, function in list(functions.items()):

            def spy(q, *args, _form=form, _function=function, **kwargs):
                calls.append((_form, q.shape[2]))
                return _function(q, *args, **kwargs)

            monkeypatch.setitem(functions, form, spy)
    model(x)
    assert calls == [("recurrent", 9)] * model.config.decoder_layers


def test_standard_outputs_and_loss():
    model = tiny_model()
    x = tokens()
    labels = x.clone()
    labels[:, :4] = -100
    out = model(x, labels=labels, output_hidden_states=True)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.logits.shape == (2, 19, 64)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert isinstance(cache_of(out), RetNetCache)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    as_tuple = model(x, labels=labels, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_logits_to_keep():
    model = tiny_model()
    x = tokens()
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(x, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])


def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    x = tokens()
    embeds = model.get_input_embeddings()(x)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(x).logits)


def test_backbone_returns_base_output():
    model = tiny_model()
    out = model.model(tokens())
    assert isinstance(out, BaseModelOutputWithPast)
    assert out.last_hidden_state.shape == (2, 19, 32)
    assert isinstance(model.base_model, RetNetModel)


def test_standard_config_names_alias_torchscale_names():
    config = RetNetConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        decoder_value_embed_dim=64,
        tie_word_embeddings=True,
    )
    assert (config.decoder_embed_dim, config.decoder_layers, config.decoder_retention_heads) == (64, 3, 4)
    assert config.decoder_ffn_embed_dim == 96 and config.share_decoder_input_output_embed
    assert config.hidden_size == 64 and config.num_attention_heads == 4 and config.intermediate_size == 96
    assert RetNetConfig().decoder_embed_dim // RetNetConfig().decoder_retention_heads == 256  # retnet_base


def test_tied_and_untied_embeddings():
    tied = tiny_model(share_decoder_input_output_embed=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    untied = tiny_model()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_sequence_classification_pools_the_last_real_token():
    torch.manual_seed(0)
    model = RetNetForSequenceClassification(tiny_config(num_labels=3)).double().eval()
    x = tokens(batch=1, length=9)
    alone = model(x).logits
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # right padding with pad_token_id 0
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).long()
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, alone)
    torch.testing.assert_close(model(padded).logits, alone)  # found from pad_token_id
    out = model(x, labels=torch.tensor([2]))
    assert out.logits.shape == (1, 3) and out.loss > 0


def test_sequence_classification_takes_the_retention_form_as_the_causal_lm_does():
    """`retention_form` chooses the form for one call: on a left-padded batch the three forms give the same logits,
    each row's those of its text alone; an unknown form is refused, naming the allowed ones."""
    from test_generation import left_pad, ragged_prompts

    torch.manual_seed(0)
    model = RetNetForSequenceClassification(tiny_config(num_labels=3, recurrent_chunk_size=4)).double().eval()
    prompts = ragged_prompts()
    ids, mask = left_pad(prompts)
    logits = {form: model(ids, attention_mask=mask, retention_form=form).logits for form in FORMS}
    assert logits["parallel"].shape == (len(prompts), 3)
    for form in ("chunkwise", "recurrent"):
        torch.testing.assert_close(logits[form], logits["parallel"], rtol=1e-10, atol=1e-10)
    for row, p in enumerate(prompts):
        alone = model(p[None], retention_form="parallel").logits
        torch.testing.assert_close(logits["parallel"][row : row + 1], alone, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="auto, parallel, chunkwise, recurrent"):
        model(ids, attention_mask=mask, retention_form="sideways")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(decoder_embed_dim=30, decoder_retention_heads=4), "decoder_embed_dim"),
        (dict(decoder_value_embed_dim=49), "decoder_value_embed_dim"),
        (dict(decoder_embed_dim=30, decoder_retention_heads=2, decoder_value_embed_dim=48), "even"),
        (dict(activation_fn="relu"), "activation_fn"),
        (dict(retention_form="fast"), "retention_form"),
        (dict(recurrent_chunk_size=0), "recurrent_chunk_size"),
        (dict(decoder_layers=0), "decoder_layers"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="swish, gelu"):
        tiny_config(activation_fn="relu")
    with pytest.raises(ValueError, match="auto, parallel, chunkwise, recurrent"):
        tiny_model()(tokens(), retention_form="sideways")


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    x = tokens()
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(x[0])
    with pytest.raises(ValueError, match="inputs_embeds must have shape"):
        model(inputs_embeds=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="attention_mask has 5 columns"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(x, position_ids=torch.arange(5)[None])
    cache = cache_of(model(x, use_cache=True))
    with pytest.raises(ValueError, match="batch of 2 rows"):
        model(x[:1, :1], cache=cache)
    with pytest.raises(TypeError, match="RetNetCache"):
        model(x, cache=((torch.zeros(1),),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_over_8k_tokens_stays_finite(dtype):
    model = tiny_model(torch.float32, recurrent_chunk_size=512).to(dtype)
    x = torch.randint(3, 64, (1, 8192), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, use_cache=True)
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all()
    assert all(torch.isfinite(s).all() and s.dtype == torch.float32 for s, _ in cache_of(out).states)
    # and the half-precision model follows the float32 one
    reference = tiny_model(torch.float32, recurrent_chunk_size=512)
    with torch.no_grad():
        ref = reference(x[:, -512:]).logits
        low = model(x[:, -512:]).logits.float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_rotation_angles_survive_half_precision_loading(tmp_path):
    """The rel-pos buffers stay float32 when a model is loaded in bf16 (_keep_in_fp32_modules_strict)."""
    tiny_model().save_pretrained(tmp_path)
    loaded = RetNetForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.retnet_rel_pos.angle.dtype == torch.float32
    assert loaded.model.layers[0].retention.q_proj.weight.dtype == torch.bfloat16


def test_flash_linear_attention_variant_forms_agree():
    """rotary_style="neox", no retention normalisation, an affine group norm: the forms still agree exactly."""
    model = tiny_model(
        torch.float64,
        rotary_style="neox",
        retention_normalization=False,
        group_norm_affine=True,
        no_scale_embedding=True,
        recurrent_chunk_size=4,
    )
    with torch.no_grad():
        model.model.layers[0].retention.group_norm.weight.uniform_(0.5, 1.5)
    assert "model.layers.0.retention.group_norm.weight" in model.state_dict()
    x = tokens(length=15)
    ref = model(x, retention_form="parallel").logits
    for form in ("chunkwise", "recurrent"):
        torch.testing.assert_close(model(x, retention_form=form).logits, ref, rtol=1e-10, atol=1e-10)
    angle = model.model.retnet_rel_pos.angle
    half = angle.shape[0] // 2
    torch.testing.assert_close(angle[:half], angle[half:])
    torch.testing.assert_close(angle[1].double(), torch.tensor(10000 ** (-2 / 16), dtype=torch.float64))


def test_rotary_styles_differ():
    x = tokens(length=12)
    a = tiny_model(torch.float64)(x).logits
    b = tiny_model(torch.float64, rotary_style="neox")(x).logits
    assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_training_gradients_agree_across_forms_float64(padded):
    ids = tokens(length=21)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0  # left padding
    grads = {}
    for form in FORMS:
        model = tiny_model(torch.float64).train()
        model(ids, attention_mask=mask, labels=ids, retention_form=form, use_cache=False).loss.backward()
        grads[form] = {name: p.grad for name, p in model.named_parameters()}
    for form in ("chunkwise", "recurrent"):
        assert grads[form].keys() == grads["parallel"].keys()
        for name, grad in grads[form].items():
            torch.testing.assert_close(grad, grads["parallel"][name], rtol=1e-9, atol=1e-12, msg=name)


def test_training_gradient_matches_finite_differences():
    model = tiny_model(
        torch.float64, decoder_embed_dim=8, decoder_value_embed_dim=8, decoder_ffn_embed_dim=8, recurrent_chunk_size=2
    ).train()
    embeds = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: model(inputs_embeds=x, retention_form="chunkwise", use_cache=False).logits, (embeds,)
    )


def test_training_keeps_only_matmul_inputs_for_the_backward_pass():
    # Activation memory: the backward pass keeps each layer's matrix-multiply inputs and recomputes the rest, so
    # no [C, C] retention scores and no element-wise intermediates are held: per token and layer, the inputs of
    # both norms and their outputs (4 d), q, k (2 d), v, g and the gated output (3 dv), fc1, gate and their
    # product (3 f); then the final norm (its input, output and [B, T, 1] factor).
    config = tiny_config(recurrent_chunk_size=8)
    model = RetNetModel(config).train()
    batch, length = 2, 32
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(tokens(batch, length), use_cache=False).last_hidden_state
    chunk = config.recurrent_chunk_size
    assert not [t.shape for t in saved.values() if t.dim() >= 2 and t.shape[-2:] == (chunk, chunk)]
    d, dv, f = config.decoder_embed_dim, config.decoder_value_embed_dim, config.decoder_ffn_embed_dim
    per_layer = 6 * d + 3 * dv + 3 * f + 1
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(
        t.untyped_storage().nbytes() for key, t in saved.items() if key not in weights and t.dtype.is_floating_point
    )
    assert activations <= (config.decoder_layers * per_layer + 2 * d + 1) * batch * length * 4, activations
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("requested", [False, True])
def test_hidden_states_are_kept_only_when_asked(requested):
    """Without output_hidden_states a no-grad prefill holds no layer's input while the later layers run (at 16k
    tokens each copy is 50 MB at the 125m size); with it, they are all returned."""
    import weakref

    model = tiny_model(decoder_layers=3)
    seen = []
    first = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    alive_at_last_layer = []
    last = model.model.layers[-1].register_forward_pre_hook(
        lambda m, args: alive_at_last_layer.append(seen[0]() is not None)
    )
    with torch.no_grad():
        out = model(tokens(length=16), output_hidden_states=requested)
    first.remove()
    last.remove()
    assert alive_at_last_layer == [requested]
    assert (out.hidden_states is not None) == requested
    if requested:
        assert len(out.hidden_states) == model.config.decoder_layers + 1
