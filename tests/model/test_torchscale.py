"""Parity with the reference implementation: Microsoft torchscale 0.3.0's `RetNetDecoder`.

Both models get the same weights (torchscale's state dict, loaded into ours by renaming only) and must produce the
same logits in float64: ours in each of its three forms against torchscale's parallel form, and against its
recurrent form fed token by token. Also greedy decoding, the initialisation's statistics, and the inexactness of
torchscale's own chunkwise form, which ours does not share.

torchscale (`pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`) imports `timm.models.layers.drop_path`
only for stochastic depth; timm does not import next to the CPU torch wheel, so a stand-in is put into
`sys.modules` while torchscale is imported and taken out again afterwards.
"""

import math

import pytest
import torch
from torch import nn

from retnet_hf import RetNetConfig, RetNetForCausalLM
from retnet_hf.conversion import from_torchscale_key
from retnet_hf.model.modeling_retnet import RetNetRMSNorm

from conftest import import_torchscale, logits_token_by_token, random_ids, relative_difference


TorchscaleConfig, RetNetDecoder = import_torchscale()
from torchscale.component.gate_linear_unit import GLU as TorchscaleGLU  # noqa: E402
from torchscale.component.rms_norm import RMSNorm as TorchscaleRMSNorm  # noqa: E402


VOCAB, DIM, VALUE_DIM, FFN_DIM, LAYERS, HEADS = 64, 32, 48, 64, 2, 2
LENGTH = 19
CHUNK = 5  # does not divide LENGTH: our chunkwise form gets a short last chunk
TOLERANCE = 1e-5


def dims(**fields):
    base = dict(
        vocab_size=VOCAB,
        decoder_embed_dim=DIM,
        decoder_value_embed_dim=VALUE_DIM,
        decoder_ffn_embed_dim=FFN_DIM,
        decoder_layers=LAYERS,
        decoder_retention_heads=HEADS,
        layernorm_eps=1e-6,
        recurrent_chunk_size=CHUNK,
    )
    base.update(fields)
    return base


def build_torchscale(seed=0, chunkwise=False, qk_gain=4.0, **fields) -> "RetNetDecoder":
    """A float64 torchscale decoder with random weights, its RMSNorm weights randomised too (they start at 1).

    q_proj and k_proj are scaled by `qk_gain`: with torchscale's own init the rows of `(q k^T) * decay` sum to
    less than 1 in absolute value at these sizes, and its parallel form's abs-sum row normalisation (clamped at
    1) would never act; with a gain of 4 it does.
    """
    torch.manual_seed(seed)
    fields = dims(**fields)
    args = TorchscaleConfig(chunkwise_recurrent=chunkwise, **fields)
    decoder = RetNetDecoder(args, embed_tokens=nn.Embedding(fields["vocab_size"], fields["decoder_embed_dim"]))
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(qk_gain)
    return decoder.double().eval()


def renamed(state_dict):
    """torchscale's keys -> ours: `output_projection` is `lm_head`, everything else under `model.`."""
    return {from_torchscale_key(key): value for key, value in state_dict.items()}


def build_ours(torchscale_decoder=None, chunk=CHUNK, **fields) -> RetNetForCausalLM:
    config = RetNetConfig(**dims(recurrent_chunk_size=chunk, **fields))
    model = RetNetForCausalLM(config).double().eval()
    if torchscale_decoder is not None:
        model.load_state_dict(renamed(torchscale_decoder.state_dict()), strict=True)
    return model


def random_tokens(batch=2, length=LENGTH, seed=1):
    return random_ids(batch, length, seed, VOCAB, low=0)


@torch.no_grad()
def torchscale_parallel(decoder, tokens):
    return decoder(tokens)[0]


@torch.no_grad()
def torchscale_recurrent(decoder, tokens):
    """torchscale's incremental decoding: the whole prefix each call, of which it embeds the last token."""
    incremental_state = {}
    steps = [decoder(tokens[:, : t + 1], incremental_state=incremental_state)[0][:, -1] for t in range(tokens.shape[1])]
    return torch.stack(steps, dim=1)


def check_parity(fields):
    decoder = build_torchscale(**fields)
    model = build_ours(decoder, **fields)
    if fields.get("share_decoder_input_output_embed"):
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokens = random_tokens()
    reference = torchscale_parallel(decoder, tokens)
    reference_recurrent = torchscale_recurrent(decoder, tokens)
    # torchscale against itself: the two reference forms agree (up to its layernorm_eps).
    assert relative_difference(reference_recurrent, reference) < TOLERANCE

    diffs = {}
    with torch.no_grad():
        for form in ("parallel", "chunkwise", "recurrent"):
            logits = model(tokens, retention_form=form).logits
            assert logits.dtype == torch.float64 and logits.shape == reference.shape
            diffs[form] = relative_difference(logits, reference)
            diffs[f"{form} vs torchscale recurrent"] = relative_difference(logits, reference_recurrent)
    diffs["token by token vs torchscale recurrent"] = relative_difference(
        logits_token_by_token(model, tokens), reference_recurrent
    )
    assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layernorm_embedding", [False, True], ids=["no-lnemb", "lnemb"])
@pytest.mark.parametrize("no_scale_embedding", [False, True], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("activation", ["swish", "gelu"])
def test_logits_match_torchscale(activation, no_scale_embedding, layernorm_embedding, tied):
    check_parity(
        dict(
            activation_fn=activation,
            no_scale_embedding=no_scale_embedding,
            layernorm_embedding=layernorm_embedding,
            share_decoder_input_output_embed=tied,
        )
    )


@pytest.mark.parametrize("activation", ["swish", "gelu"])
def test_deepnorm_logits_match_torchscale(activation):
    # torchscale's deepnorm=True switches the decoder to post-norm (decoder_normalize_before=False, so
    # x = norm(alpha * x + f(x)) in each sublayer) and drops the final `layer_norm`.
    check_parity(dict(activation_fn=activation, deepnorm=True, no_scale_embedding=False))


def test_state_dict_keys_and_buffers_match_torchscale():
    for fields in (dict(), dict(layernorm_embedding=True, share_decoder_input_output_embed=True)):
        decoder = build_torchscale(**fields)
        fresh = build_ours(**fields)  # not loaded: its own buffers
        theirs = renamed(decoder.state_dict())
        assert set(fresh.state_dict()) == set(theirs)
        for key, value in fresh.state_dict().items():
            assert value.shape == theirs[key].shape, key
        for buffer in ("angle", "decay"):
            ours_buffer = getattr(fresh.model.retnet_rel_pos, buffer)
            torch.testing.assert_close(ours_buffer, getattr(decoder.retnet_rel_pos, buffer), rtol=0, atol=0)


def _float64_rmsnorm_forward(self, x):
    """torchscale's RMSNorm.forward, except that float64 stays float64 (it computes in float32 via x.float())."""
    output = self._norm(x if x.dtype == torch.float64 else x.float()).type_as(x)
    return output if self.weight is None else output * self.weight


def _float64_glu_forward(self, x):
    """torchscale's GLU.forward (dropout 0), except that float64 stays float64 (its activation runs in float32)."""
    x_shape = x.shape
    x = x.reshape(-1, x.size(-1))
    g = self.gate(x)
    x = self.fc1(x)
    x = self.activation_fn(x if x.dtype == torch.float64 else x.float()).type_as(x) * g
    return self.fc2(x).view(x_shape)


def test_zero_eps_matches_torchscale_parallel_exactly(monkeypatch):
    """With eps = 0 the group norm removes torchscale's abs-sum row normalisation exactly, which ours leaves out.

    torchscale's RMSNorm and its feed-forward activation run in float32 even in a float64 model (about 1e-7
    relative error in the logits), so for this comparison they are made to compute in float64, as ours do. q and
    k are scaled up (qk_gain 8) so that the abs-sum normalisation acts; with eps = 1e-6 it then shows (about
    6e-6 relative).
    """
    fields = dict(activation_fn="swish", no_scale_embedding=False, layernorm_embedding=True)
    tokens = random_tokens()

    def differences(eps):
        decoder = build_torchscale(qk_gain=8.0, layernorm_eps=eps, **fields)
        model = build_ours(decoder, **fields)
        for module in model.modules():  # a config's layernorm_eps must be > 0; the norms take 0 here
            if isinstance(module, RetNetRMSNorm):
                module.eps = eps
        reference = torchscale_parallel(decoder, tokens)
        with torch.no_grad():
            diffs = {
                form: relative_difference(model(tokens, retention_form=form).logits, reference)
                for form in ("parallel", "chunkwise", "recurrent")
            }
        diffs["torchscale recurrent"] = relative_difference(torchscale_recurrent(decoder, tokens), reference)
        return diffs

    unpatched = differences(0.0)
    assert 1e-9 < max(unpatched.values()) < TOLERANCE, unpatched  # torchscale's float32 norms
    monkeypatch.setattr(TorchscaleRMSNorm, "forward", _float64_rmsnorm_forward)
    monkeypatch.setattr(TorchscaleGLU, "forward", _float64_glu_forward)
    exact = differences(0.0)
    assert max(exact.values()) < 1e-10, exact
    # Control: with eps > 0 the abs-sum normalisation is no longer removed exactly (so it does act here).
    with_eps = differences(1e-6)
    assert with_eps["parallel"] > 1e-8, with_eps


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_generation_matches_torchscale_incremental_decoding(tied):
    # Tied to a large embedding, the model just repeats its last token; a small unscaled one lets it vary.
    fields = dict(activation_fn="swish", no_scale_embedding=tied, share_decoder_input_output_embed=tied)
    decoder = build_torchscale(seed=3, **fields)
    if tied:
        with torch.no_grad():
            decoder.embed_tokens.weight.mul_(0.02)
    model = build_ours(decoder, **fields)
    prompt = random_tokens(batch=2, length=7, seed=4)
    new_tokens = 10

    with torch.no_grad():
        ours = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens
        )
        sequence, incremental_state = prompt[:, :1], {}
        for t in range(prompt.shape[1] + new_tokens - 1):
            logits = decoder(sequence, incremental_state=incremental_state)[0][:, -1]
            following = prompt[:, t + 1] if t + 1 < prompt.shape[1] else logits.argmax(-1)
            sequence = torch.cat([sequence, following[:, None]], dim=1)

    assert sequence.shape == (2, prompt.shape[1] + new_tokens)
    assert all(len(set(row.tolist())) > 1 for row in sequence[:, prompt.shape[1] :])  # not a trivial repetition
    assert torch.equal(ours, sequence), (ours, sequence)


def test_torchscale_chunkwise_is_further_from_its_parallel_form_than_ours():
    """torchscale's chunkwise form rescales the cross-chunk state by abs-sums the group norm cannot remove.

    Its error is largest with torchscale's own initialisation (qk_gain 1: about 1e-3 of the logits' scale here),
    where the parallel form's abs-sum clamp is inactive but the chunk state's is not.
    """
    chunk, length = 5, 20  # torchscale's chunkwise needs the chunk to divide the length
    fields = dict(activation_fn="swish", no_scale_embedding=False, qk_gain=1.0)
    decoder = build_torchscale(recurrent_chunk_size=chunk, **fields)
    chunked = build_torchscale(chunkwise=True, recurrent_chunk_size=chunk, **fields)
    chunked.load_state_dict(decoder.state_dict(), strict=True)
    del fields["qk_gain"]
    model = build_ours(decoder, chunk=chunk, **fields)
    tokens = random_tokens(length=length)

    reference = torchscale_parallel(decoder, tokens)
    with torch.no_grad():
        theirs = relative_difference(chunked(tokens)[0], reference)
        ours = relative_difference(model(tokens, retention_form="chunkwise").logits, reference)
    assert ours < TOLERANCE
    assert theirs > 100 * ours, (theirs, ours)


def xavier_uniform_std(weight, gain):
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("deepnorm", [False, True], ids=["prenorm", "deepnorm"])
def test_fresh_initialisation_statistics_match_torchscale(deepnorm):
    fields = dict(
        vocab_size=1024,
        decoder_embed_dim=256,
        # dv != 2d: at dv = 2d, out_proj's xavier gain 2^-1 has the same std as nn.Linear's default init
        decoder_value_embed_dim=128,
        decoder_ffn_embed_dim=512,
        decoder_layers=2,
        decoder_retention_heads=2,
        deepnorm=deepnorm,
    )
    torch.manual_seed(0)
    args = TorchscaleConfig(**fields)
    theirs = RetNetDecoder(args, embed_tokens=nn.Embedding(fields["vocab_size"], fields["decoder_embed_dim"]))
    torch.manual_seed(1)
    ours = RetNetForCausalLM(RetNetConfig(**fields))
    deepnorm_gain = (8.0 * fields["decoder_layers"]) ** -0.25 if deepnorm else 1.0

    def close(a, b):
        return abs(a / b - 1) < 0.05

    for i in range(fields["decoder_layers"]):
        mine, ref = ours.model.layers[i], theirs.layers[i]
        for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
            w, w_ref = getattr(mine.retention, name).weight, getattr(ref.retention, name).weight
            assert close(w.std().item(), w_ref.std().item()), (i, name, w.std().item(), w_ref.std().item())
            # xavier uniform, gain 2^-2.5 (v_proj also scaled down under deepnorm): bounded by sqrt(3) std
            expected = xavier_uniform_std(w, 2**-2.5 * (deepnorm_gain if name == "v_proj" else 1.0))
            assert close(w.std().item(), expected), (i, name, w.std().item(), expected)
            assert w.abs().max().item() <= math.sqrt(3) * expected * (1 + 1e-6)
        # out_proj: torchscale HEAD's gain 2^-1 (0.3.0 on the index uses gain 1: twice ours).
        w, w_ref = mine.retention.out_proj.weight, ref.retention.out_proj.weight
        expected = xavier_uniform_std(w, 0.5 * deepnorm_gain)
        assert close(w.std().item(), expected), (i, w.std().item(), expected)
        assert w.abs().max().item() <= math.sqrt(3) * expected * (1 + 1e-6)
        assert close(w_ref.std().item(), 2 * expected)
        for name in ("fc1", "gate", "fc2"):
            w, w_ref = getattr(mine.ffn, name).weight, getattr(ref.ffn, name).weight
            assert close(w.std().item(), w_ref.std().item()), (i, name, w.std().item(), w_ref.std().item())
        for norm in (mine.retention_layer_norm, mine.final_layer_norm):
            assert torch.all(norm.weight == 1)

    # untied output layer: normal(0, d^-0.5) on both sides
    lm_head, output_projection = ours.lm_head.weight, theirs.output_projection.weight
    assert close(lm_head.std().item(), output_projection.std().item())
    assert abs(lm_head.mean().item()) < 0.05 * lm_head.std().item()
    for buffer in ("angle", "decay"):
        torch.testing.assert_close(
            getattr(ours.model.retnet_rel_pos, buffer), getattr(theirs.retnet_rel_pos, buffer), rtol=0, atol=0
        )
