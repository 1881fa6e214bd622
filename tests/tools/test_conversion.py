"""Checkpoint conversion: torchscale/fairseq, syncdoth-format and flash-linear-attention (fla) sources.

Everything is built locally from tiny random models; nothing is downloaded. torchscale 0.3.0 is the reference for
the torchscale and syncdoth formats. fla is checked twice. Its math is written here in plain PyTorch from its
published formulas (`fla/layers/multiscale_retention.py`, `fla/ops/retention/naive.py`, `fla/modules/rotary.py`,
`fla/modules/fused_norm_gate.py`, `fla/modules/mlp.py`): a fast reference, in float64, for folders written here (two
layouts, sharded, tied). And fla's own model (fla 0.6.0), saved by fla, is checked against its conversion in float32
with its Triton kernels run on the CPU by Triton's interpreter, in a child process (tests/fla_interpreter.py; the
cases are in fla_conversion_cases.py).
"""

import argparse
import errno
import json
import os
import runpy
import signal
import stat
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

import retnet_hf.conversion as conversion
from retnet_hf.cli import main
from retnet_hf.conversion import ConversionError, convert_checkpoint, from_torchscale_key
from retnet_hf.presets import preset_config

from conftest import (
    REPO_ROOT,
    cache_of,
    import_torchscale,
    logits_token_by_token,
    random_ids,
    relative_difference,
    run_interpreted,
)


TorchscaleConfig, RetNetDecoder = import_torchscale()


VOCAB, DIM, VALUE_DIM, FFN_DIM, LAYERS, HEADS = 64, 32, 48, 64, 2, 2
FORMS = ("parallel", "chunkwise", "recurrent")
TOLERANCE = 1e-5  # torchscale computes its RMSNorms in float32 even in a float64 model


def tokens(batch=2, length=19, seed=1):
    return random_ids(batch, length, seed, VOCAB, low=0)


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, **kwargs).eval()


@torch.no_grad()
def all_forms(model, ids):
    """Logits of every retention form, token by token with the cache, and a prefill in pieces continued by it."""
    result = {form: model(ids, retention_form=form).logits for form in FORMS}
    result["cache, token by token"] = logits_token_by_token(model, ids)
    first = model(ids[:, :7], use_cache=True)
    second = model(ids[:, 7:12], cache=cache_of(first), use_cache=True)
    rest = logits_token_by_token(model, ids[:, 12:], cache_of(second))
    result["cache, prefill 7 + 5 then tokens"] = torch.cat([first.logits, second.logits, rest], dim=1)
    return result


# ---------------------------------------------------------------------------------------------------------------
# torchscale and syncdoth
# ---------------------------------------------------------------------------------------------------------------

TORCHSCALE_FIELDS = dict(
    vocab_size=VOCAB,
    decoder_embed_dim=DIM,
    decoder_value_embed_dim=VALUE_DIM,
    decoder_ffn_embed_dim=FFN_DIM,
    decoder_layers=LAYERS,
    decoder_retention_heads=HEADS,
    activation_fn="swish",
    no_scale_embedding=False,
    layernorm_embedding=True,
    layernorm_eps=1e-6,
    recurrent_chunk_size=5,
)


def build_torchscale(seed=0, **overrides):
    """A float64 torchscale decoder with random weights (norm weights too; q and k scaled up so that the parallel
    form's abs-sum normalisation acts)."""
    fields = dict(TORCHSCALE_FIELDS, **overrides)
    torch.manual_seed(seed)
    decoder = RetNetDecoder(TorchscaleConfig(**fields), embed_tokens=nn.Embedding(VOCAB, DIM))
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4.0)
            elif name == "embed_tokens.weight":
                parameter.mul_(0.2)
    return decoder.double().eval(), fields


@torch.no_grad()
def torchscale_logits(decoder, ids):
    return decoder(ids)[0]


def save_torchscale(decoder, fields, folder: Path, kind: str) -> Path:
    """A torchscale checkpoint as fairseq writes it (`args` Namespace or `cfg` dict) or a bare state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    state = decoder.state_dict()
    if kind == "args":
        args = argparse.Namespace(arch="retnet_base", task="language_modeling", lr=[5e-4], seed=1, **fields)
        del args.vocab_size  # fairseq takes it from the dictionary: the converter reads it off the embedding
        payload = {"model": {f"decoder.{k}": v for k, v in state.items()}, "args": args, "optimizer_history": []}
        path = folder / "checkpoint_best.pt"
    elif kind == "cfg":
        model_cfg = dict(fields, _name="retnet_base")
        payload = {
            "model": {f"decoder.{k}": v for k, v in state.items()},
            "cfg": {"model": model_cfg, "task": {"_name": "language_modeling"}, "common": {"seed": 1}},
            "args": None,
        }
        path = folder / "checkpoint_last.pt"
    else:
        payload = state
        path = folder / "decoder.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def torchscale_model():
    return build_torchscale()


@pytest.mark.parametrize("kind", ["args", "cfg", "bare"])
def test_torchscale_checkpoint_converts_with_equal_logits(tmp_path, torchscale_model, kind):
    decoder, fields = torchscale_model
    path = save_torchscale(decoder, fields, tmp_path / "src", kind)
    config_json = None
    if kind == "bare":
        config_json = tmp_path / "torchscale.json"
        config_json.write_text(json.dumps(fields))
    out = convert_checkpoint("torchscale", path, tmp_path / "out", config_json=config_json)

    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    assert config["decoder_embed_dim"] == DIM and config["vocab_size"] == VOCAB and config["dtype"] == "float64"
    assert config["no_scale_embedding"] is False and config["layernorm_embedding"] is True
    assert {"modeling_retnet.py", "configuration_retnet.py", "retention.py"} <= {p.name for p in out.iterdir()}

    model = load(out)
    ids = tokens()
    reference = torchscale_logits(decoder, ids)
    diffs = {form: relative_difference(logits, reference) for form, logits in all_forms(model, ids).items()}
    assert max(diffs.values()) < TOLERANCE, diffs
    # a control: the converted model is not trivially close to anything (another seed's torchscale model is far)
    other, _ = build_torchscale(seed=5)
    assert relative_difference(torchscale_logits(other, ids), reference) > 0.1


def test_torchscale_greedy_generation_equals_its_incremental_decoding(tmp_path):
    decoder, fields = build_torchscale(seed=3)
    out = convert_checkpoint("torchscale", save_torchscale(decoder, fields, tmp_path / "src", "args"), tmp_path / "o")
    model = load(out)
    prompt, new_tokens = tokens(batch=2, length=7, seed=4), 10
    with torch.no_grad():
        ours = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0
        )
        sequence, incremental_state = prompt[:, :1], {}
        for t in range(prompt.shape[1] + new_tokens - 1):
            logits = decoder(sequence, incremental_state=incremental_state)[0][:, -1]
            following = prompt[:, t + 1] if t + 1 < prompt.shape[1] else logits.argmax(-1)
            sequence = torch.cat([sequence, following[:, None]], dim=1)
    assert all(len(set(row.tolist())) > 1 for row in sequence[:, prompt.shape[1] :])  # not a trivial repetition
    assert torch.equal(ours, sequence), (ours, sequence)


def test_tied_torchscale_checkpoint_converts(tmp_path):
    decoder, fields = build_torchscale(seed=2, share_decoder_input_output_embed=True)
    out = convert_checkpoint("torchscale", save_torchscale(decoder, fields, tmp_path / "src", "cfg"), tmp_path / "o")
    assert json.loads((out / "config.json").read_text())["share_decoder_input_output_embed"] is True
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokens()
    with torch.no_grad():
        assert relative_difference(model(ids).logits, torchscale_logits(decoder, ids)) < TOLERANCE


def tiny_tokenizer_file(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def write_syncdoth_folder(decoder, fields, folder: Path, shards=3, weights="safetensors") -> Path:
    """syncdoth/RetNet's layout: torchscale keys under `model.`, `lm_head`, torchscale-named config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {from_torchscale_key(k): v.clone() for k, v in decoder.state_dict().items()}
    config = dict(
        fields,
        model_type="retnet",
        is_decoder=True,
        forward_impl="parallel",
        use_glu=True,
        use_lm_decay=False,
        subln=True,
        deepnorm=False,
        decoder_normalize_before=True,
        tie_word_embeddings=False,
        drop_path_rate=0.0,
        z_loss_coeff=0.0,
        initializer_range=0.02,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float64",
        transformers_version="4.29.1",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        write_sharded(state, folder, shards)
    tiny_tokenizer_file(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def write_sharded(state, folder: Path, shards: int):
    keys = list(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * size : (i + 1) * size]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


class SpyOpen:
    """Wraps safetensors' `safe_open`: records which files are open and which tensors are read when."""

    def __init__(self, real, events):
        self.real, self.events, self.open_now = real, events, set()

    def __call__(self, path, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.inner = spy.real(path, *args, **kwargs).__enter__()
                spy.open_now.add(path)
                spy.events.append(("open", Path(path).name, len(spy.open_now)))
                return self

            def __exit__(self, *exc):
                spy.open_now.discard(path)
                spy.events.append(("close", Path(path).name, len(spy.open_now)))
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_slice(self, name):
                return self.inner.get_slice(name)

            def get_tensor(self, name):
                spy.events.append(("read", Path(path).name, len(spy.open_now)))
                return self.inner.get_tensor(name)

        return Handle()


def test_syncdoth_sharded_folder_reads_one_shard_at_a_time(tmp_path, torchscale_model, monkeypatch):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=3)
    events = []
    monkeypatch.setattr(conversion, "safe_open", SpyOpen(conversion.safe_open, events))
    real_save = conversion.save_file
    monkeypatch.setattr(
        conversion,
        "save_file",
        lambda tensors, path, **kw: (
            events.append(("write", Path(path).name, len(tensors))),
            real_save(tensors, path, **kw),
        )[1],
    )
    out = convert_checkpoint("syncdoth", src, tmp_path / "out", max_shard_size="40KB")

    # never two source files open at once; every tensor read while only its own file is open
    assert max(count for kind, _, count in events if kind in ("open", "read")) == 1
    reads = [name for kind, name, _ in events if kind == "read"]
    runs = [name for i, name in enumerate(reads) if i == 0 or reads[i - 1] != name]
    assert runs == sorted(set(reads)) and len(runs) == 3, runs  # each shard read in one go, one after another
    assert len(reads) == len(decoder.state_dict())  # each tensor read once
    # the output is written as it fills: a shard is written before the last source shard is opened
    last_open = max(i for i, (kind, name, _) in enumerate(events) if kind == "open" and name == runs[-1])
    assert any(kind == "write" for kind, _, _ in events[:last_open])

    written = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(written) > 1 and (out / "model.safetensors.index.json").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "Converted with `retnet-hf convert --from syncdoth`" in card and str(src) in card
    assert card.startswith("---") and "license: other" in card  # the source names no license

    model = load(out)
    ids = tokens()
    reference = torchscale_logits(decoder, ids)
    diffs = {form: relative_difference(logits, reference) for form, logits in all_forms(model, ids).items()}
    assert max(diffs.values()) < TOLERANCE, diffs


def test_syncdoth_pytorch_bin_converts(tmp_path, torchscale_model):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", weights="bin")
    model = load(convert_checkpoint("syncdoth", src, tmp_path / "out"))
    ids = tokens()
    with torch.no_grad():
        assert relative_difference(model(ids).logits, torchscale_logits(decoder, ids)) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# fla
# ---------------------------------------------------------------------------------------------------------------

FLA_CONFIG = dict(
    model_type="retnet",
    attn_mode="chunk",
    hidden_size=DIM,
    expand_k=1,
    expand_v=1.5,  # value dim 48, per head 24
    hidden_ratio=2,
    intermediate_size=None,  # fla's rule: int(32 * 2 * 2/3) = 42, rounded up to 256
    num_hidden_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=None,
    feature_map=None,
    hidden_act="swish",
    use_short_conv=False,
    conv_size=4,
    use_output_gate=True,
    max_position_embeddings=2048,
    elementwise_affine=True,
    norm_eps=1e-6,
    attn=None,
    use_cache=True,
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.02,
    fuse_norm=True,
    fuse_swiglu=True,
    fuse_cross_entropy=True,
    vocab_size=VOCAB,
    architectures=["RetNetForCausalLM"],
    torch_dtype="float64",
)


def fla_weights(config, seed=0):
    """Random float64 weights under fla's names."""
    generator = torch.Generator().manual_seed(seed)
    d, dv = config["hidden_size"], int(config["hidden_size"] * config["expand_v"])
    f = config["intermediate_size"] or 256
    v = config["vocab_size"]

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    def norm(n):
        return 1 + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)

    gate_norm = "g_norm_swish_gate" if config["fuse_norm"] else "g_norm"
    weights = {"model.embeddings.weight": randn(v, d, scale=1.0), "model.norm.weight": norm(d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "attn_norm.weight": norm(d),
                p + "attn.q_proj.weight": randn(d, d, scale=d**-0.5),
                p + "attn.k_proj.weight": randn(d, d, scale=d**-0.5),
                p + "attn.v_proj.weight": randn(dv, d, scale=d**-0.5),
                p + "attn.g_proj.weight": randn(dv, d, scale=d**-0.5),
                p + "attn.o_proj.weight": randn(d, dv, scale=dv**-0.5),
                p + f"attn.{gate_norm}.weight": norm(dv // config["num_heads"]),
                p + "mlp_norm.weight": norm(d),
                p + "mlp.gate_proj.weight": randn(f, d, scale=d**-0.5),
                p + "mlp.up_proj.weight": randn(f, d, scale=d**-0.5),
                p + "mlp.down_proj.weight": randn(d, f, scale=f**-0.5),
            }
        )
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = randn(v, d, scale=d**-0.5)
    return weights


def fla_reference_logits(w, config, ids):
    """fla's RetNet forward, written from its published formulas, in float64 (the rotary inverse frequencies and the
    log-decays in float32, as fla computes them). Per layer, pre-norm residual blocks:

    - RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight (attn_norm, mlp_norm, final norm), no embedding scale;
    - q, k, v, g projections; heads are contiguous slices; NeoX rotary on q and k: halves (x1, x2) rotated by
      theta_i = 1 / 10000^(2i/D) per position (rotate_half = cat(-x2, x1));
    - retention without any normalisation: o_n = sum_{m<=n} gamma_h^(n-m) (D^-0.5 q_n . k_m) v_m,
      gamma_h = 1 - 2^(-5-h);
    - gated output norm per head: RMSNorm(o_h) * weight * swish(g_h), then o_proj;
    - GLU: down_proj(swish(gate_proj(x)) * up_proj(x)), swish in float32 at least; final norm; lm_head (the
      embedding when tied).
    """
    eps, heads = config["norm_eps"], config["num_heads"]
    d = config["hidden_size"]
    head_k = d // heads
    gate_norm = "g_norm_swish_gate" if config["fuse_norm"] else "g_norm"

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    batch, length = ids.shape
    x = w["model.embeddings.weight"][ids]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_k, 2, dtype=torch.float32) / head_k))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()

    def rotary(t):  # [B, T, H, D]
        x1, x2 = t[..., : head_k // 2], t[..., head_k // 2 :]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    # fla passes the decays to its kernels as float32 logs: g_gamma = log(1 - 2^(-5-h)) in float32
    gammas = (1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float32))).log().double().exp()
    n = torch.arange(length)
    distance = (n[:, None] - n[None, :]).double()
    decay = torch.where(distance >= 0, gammas[:, None, None] ** distance.clamp(min=0), torch.zeros(()))  # [H,T,T]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "attn.q_proj.weight"].T).view(batch, length, heads, head_k)
        k = (h @ w[p + "attn.k_proj.weight"].T).view(batch, length, heads, head_k)
        v = (h @ w[p + "attn.v_proj.weight"].T).view(batch, length, heads, -1)
        g = (h @ w[p + "attn.g_proj.weight"].T).view(batch, length, heads, -1)
        q, k = rotary(q) * head_k**-0.5, rotary(k)
        scores = torch.einsum("bqhd,bkhd,hqk->bhqk", q, k, decay)
        o = torch.einsum("bhqk,bkhd->bqhd", scores, v)
        o = rms(o, w[p + f"attn.{gate_norm}.weight"]) * F.silu(g)
        x = x + o.reshape(batch, length, -1) @ w[p + "attn.o_proj.weight"].T
        h = rms(x, w[p + "mlp_norm.weight"])
        # fla's swiglu kernel computes the activation in float32 at least, as retnet-hf does (float64 here)
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w["model.embeddings.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def write_fla_folder(folder: Path, shards=2, layout_2024=False, **overrides):
    """An fla folder; `layout_2024`: fla's layout of spring 2024 (`model.embed_tokens`, one fused `gate_proj`
    [2f, d] holding the gate rows then the up rows, Llama-style config names)."""
    config = dict(FLA_CONFIG, **overrides)
    weights = fla_weights(config)
    folder.mkdir(parents=True, exist_ok=True)
    stored_config, stored = dict(config), dict(weights)
    if layout_2024:
        stored["model.embed_tokens.weight"] = stored.pop("model.embeddings.weight")
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            gate, up = stored[p + "gate_proj.weight"], stored.pop(p + "up_proj.weight")
            stored[p + "gate_proj.weight"] = torch.cat([gate, up])
        for new_name, old_name in (("num_heads", "num_attention_heads"), ("norm_eps", "rms_norm_eps")):
            stored_config[old_name] = stored_config.pop(new_name)
    (folder / "config.json").write_text(json.dumps(stored_config, indent=2))
    write_sharded(stored, folder, shards)
    return config, weights


@pytest.mark.parametrize("variant", ["untied", "tied, unfused norm", "2024 layout"])
def test_fla_folder_converts_to_fla_logits_in_every_form(tmp_path, variant):
    overrides = {
        "untied": {},
        "tied, unfused norm": dict(tie_word_embeddings=True, fuse_norm=False),
        "2024 layout": dict(layout_2024=True, norm_eps=1e-5),
    }[variant]
    config, weights = write_fla_folder(tmp_path / "fla", **overrides)
    out = convert_checkpoint("fla", tmp_path / "fla", tmp_path / "out")
    ours = json.loads((out / "config.json").read_text())
    assert ours["rotary_style"] == "neox" and ours["retention_normalization"] is False
    assert ours["group_norm_affine"] is True and ours["no_scale_embedding"] is True
    assert ours["decoder_ffn_embed_dim"] == 256 and ours["decoder_value_embed_dim"] == 48
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    assert ours["recurrent_chunk_size"] == 64  # the config's default (fla's own kernels' chunk too)
    model = load(out, recurrent_chunk_size=5)  # several chunks (and a short last one) below
    ids = tokens()
    reference = fla_reference_logits(weights, config, ids)
    diffs = {form: relative_difference(logits, reference) for form, logits in all_forms(model, ids).items()}
    assert max(diffs.values()) < 1e-12, diffs  # about 1e-15 measured
    # control: the torchscale-style variant of the same weights (pairs rotation, normalised retention) is far off
    model.model.retnet_rel_pos.rotary_style = "torchscale"
    for layer in model.model.layers:
        layer.retention.rotary_style = "torchscale"
    with torch.no_grad():
        assert relative_difference(model(ids).logits, reference) > 1e-3


def test_fla_model_saved_by_fla_converts_to_its_logits_and_greedy_tokens(tmp_path):
    """fla's own RetNetForCausalLM, tiny with random weights (default, unfused norms, tied embeddings), saved by
    fla's `save_pretrained` and converted: its logits in each attention mode, unpadded and left-padded, step by
    step through both caches, and its greedy tokens from a loop over its cache. fla's Triton kernels run in
    Triton's interpreter, in a child process (tests/tools/fla_conversion_cases.py)."""
    run_interpreted(Path(__file__).with_name("fla_conversion_cases.py"), tmp_path)


def test_fla_config_fields_map_back_to_our_size():
    """fla's config fields for our 125m size (the benchmarks' fla RetNet) map back to its widths."""
    config = preset_config("125m", 32000)
    ours = conversion._fla_model_fields(conversion.fla_config_fields(config))
    for field in (
        "vocab_size",
        "decoder_embed_dim",
        "decoder_value_embed_dim",
        "decoder_ffn_embed_dim",
        "decoder_layers",
        "decoder_retention_heads",
        "layernorm_eps",
        "share_decoder_input_output_embed",
        "group_norm_affine",
    ):
        assert ours[field] == getattr(config, field), field


def test_fla_unsupported_features_are_refused(tmp_path):
    write_fla_folder(tmp_path / "fla", use_short_conv=True)
    with pytest.raises(ConversionError, match="use_short_conv"):
        convert_checkpoint("fla", tmp_path / "fla", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Loading without retnet-hf; bad sources
# ---------------------------------------------------------------------------------------------------------------


def test_converted_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    config, weights = write_fla_folder(tmp_path / "fla", shards=1)
    out = convert_checkpoint("fla", tmp_path / "fla", tmp_path / "out")
    ids = tokens(batch=1, length=9)
    expected = fla_reference_logits(weights, config, ids)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["retnet_hf"] = None  # even an installed copy cannot be imported
        try:
            import retnet_hf
        except ImportError:
            pass
        else:
            raise SystemExit("retnet_hf is importable")
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, dtype=torch.float64)
        assert "retnet_hf" not in type(model).__module__.split(".")[0], type(model).__module__
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        print(type(model).__module__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert relative_difference(logits, expected) < 1e-10


def test_mismatched_keys_are_listed_and_nothing_is_written(tmp_path, torchscale_model):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    del state["model.layers.1.ffn.gate.weight"]
    state["model.layers.0.retention.extra_proj.weight"] = torch.zeros(2, 2)
    state["model.layers.0.retention.v_proj.weight"] = torch.zeros(VALUE_DIM + 2, DIM)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError) as error:
        convert_checkpoint("syncdoth", src, tmp_path / "out")
    message = str(error.value)
    assert "missing (1): model.layers.1.ffn.gate.weight" in message
    assert "unexpected (1): model.layers.0.retention.extra_proj.weight" in message
    assert f"mis-shaped (1): model.layers.0.retention.v_proj.weight: [{VALUE_DIM + 2}, {DIM}]" in message
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syncdoth"]  # no temporary folder left either


def test_fla_missing_key_is_named_in_fla_terms(tmp_path):
    config, weights = write_fla_folder(tmp_path / "fla", shards=1)
    del weights["model.layers.0.attn.g_norm_swish_gate.weight"]
    save_file(weights, str(tmp_path / "fla" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing \(1\): model\.layers\.0\.attn\.g_norm_swish_gate\.weight"):
        convert_checkpoint("fla", tmp_path / "fla", tmp_path / "out")


EXECUTED = []


def _record_execution():
    EXECUTED.append(True)
    return {}


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (_record_execution, ())


def test_pickle_needing_code_is_refused(tmp_path, torchscale_model):
    decoder, fields = torchscale_model
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": {f"decoder.{k}": v for k, v in decoder.state_dict().items()},
            "args": argparse.Namespace(**fields),
            "extra_state": RunsCodeWhenUnpickled(),
        },
        path,
    )
    with pytest.raises(ConversionError, match="refused") as error:
        convert_checkpoint("torchscale", path, tmp_path / "out")
    assert "weights_only" in str(error.value)
    assert not EXECUTED and not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt("Ctrl-C")])
def test_failure_while_writing_leaves_no_output(tmp_path, torchscale_model, monkeypatch, error):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(conversion, "_copy_tokenizer", broken)
    with pytest.raises(type(error), match=str(error)):
        convert_checkpoint("syncdoth", src, tmp_path / "new" / "out", max_shard_size="10KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syncdoth"]  # nor the folder made for OUT


def test_existing_output_is_not_overwritten(tmp_path, torchscale_model):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint("syncdoth", src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_convert_and_its_errors(tmp_path, torchscale_model, capsys):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    assert main(["convert", "--from", "syncdoth", str(src), str(tmp_path / "out"), "--max-shard-size", "30KB"]) == 0
    assert "converted syncdoth" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()

    assert main(["convert", "--from", "fla", str(src / "missing"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "retnet-hf convert: error:" in err and "no such file or folder" in err
    assert not (tmp_path / "out2").exists()


def test_script_exits_2_with_a_message_on_a_bad_source(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(FLA_CONFIG))
    script = REPO_ROOT / "scripts" / "convert_checkpoint.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--from", "fla", str(bad), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "retnet-hf convert: error:" in err and "no weights found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Safe by default: the output location, the config file, the layer count, a killed run, the folder's mode
# ---------------------------------------------------------------------------------------------------------------


def simulate_read_only(monkeypatch, folder: Path):
    """Root writes anywhere, whatever the mode: for root, make creating anything in `folder` fail as it would for
    anyone else (EACCES from mkdir); for others the mode (0o555, set by the caller) does it."""
    if os.geteuid() != 0:
        return
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("where", ["read-only folder", "in a new folder of a read-only folder", "under a file"])
def test_an_output_location_that_cannot_be_written_is_refused_with_a_message(
    tmp_path, torchscale_model, monkeypatch, capsys, where
):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    locked = tmp_path / "locked"
    locked.mkdir()
    if where == "under a file":
        (locked / "a-file").write_text("mine")
        out = locked / "a-file" / "out"
    else:
        out = locked / "out" if where == "read-only folder" else locked / "new" / "out"
        locked.chmod(0o555)
        simulate_read_only(monkeypatch, locked)
    try:
        assert main(["convert", "--from", "syncdoth", str(src), str(out)]) == 2
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retnet-hf convert: error:"), err  # one line, no traceback
    assert f"retnet-hf convert: error: {out}: cannot create the output folder: " in err
    if where == "under a file":
        assert f"{locked / 'a-file'} is a file, not a folder; choose another output folder." in err
    else:
        assert f"cannot write in {locked} (Permission denied); choose an output folder in a location you can" in err
    assert sorted(p.name for p in locked.iterdir()) == (["a-file"] if where == "under a file" else [])
    assert (locked / "a-file").read_text() == "mine" if where == "under a file" else True


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", '[["decoder_layers", 2]]', '"decoder_layers"', "3", "null", "source config.json: a list"],
)
def test_a_config_that_is_not_a_json_object_is_refused_with_a_message(tmp_path, torchscale_model, capsys, content):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    if content.startswith("source"):
        (src / "config.json").write_text(json.dumps([json.loads((src / "config.json").read_text())]))
        bad, extra = src / "config.json", []
    else:
        bad = tmp_path / "config.json"
        bad.write_text(content)  # [["decoder_layers", 2]] is one that dict() would have taken
        extra = ["--config", str(bad)]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", "--from", "syncdoth", str(src), str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"retnet-hf convert: error: {bad}: holds a JSON"), err
    assert "not an object of config fields; write the config as one JSON object" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder


class TookTooLong(Exception):
    pass


@contextmanager
def deadline(seconds):
    """Raise TookTooLong in the test if the block runs longer than `seconds` (a hang fails, instead of hanging)."""

    def expire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "source_format, field, claimed",
    [
        ("syncdoth", "decoder_layers", 1_000_000),
        ("syncdoth", "decoder_layers", 3),
        ("torchscale", "decoder_layers", 1),
        ("fla", "num_hidden_layers", 1_000_000),
    ],
)
def test_a_config_claiming_another_layer_count_than_the_checkpoint_is_refused_quickly(
    tmp_path, torchscale_model, capsys, source_format, field, claimed
):
    decoder, fields = torchscale_model
    if source_format == "syncdoth":
        src = write_syncdoth_folder(decoder, fields, tmp_path / "src", shards=2)
    elif source_format == "torchscale":
        src = save_torchscale(decoder, fields, tmp_path / "src", "bare")
    else:
        write_fla_folder(tmp_path / "src")
        src = tmp_path / "src"
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(dict(fields, **{field: claimed}) if source_format == "torchscale" else {field: claimed})
    )
    started = time.monotonic()
    with deadline(60):  # building a million-layer model, even on the meta device, took about an hour
        code = main(["convert", "--from", source_format, str(src), str(tmp_path / "out"), "--config", str(config)])
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"the config says {field}={claimed}, but the source's weights hold {LAYERS} layers (numbered 0 to 1)" in err
    assert f"set {field} to {LAYERS} in the config (--config)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "src"]


STALL_AND_WAIT_TO_BE_KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import retnet_hf.conversion as conversion

    def stall(*args, **kwargs):  # the weights are written: the conversion is well under way
        Path(sys.argv[3]).write_text("staged")
        time.sleep(600)

    conversion._copy_tokenizer = stall
    conversion.convert_checkpoint("syncdoth", sys.argv[1], sys.argv[2])
""")


def test_a_killed_conversion_s_staging_folder_is_removed_by_the_next_one_and_nothing_else(
    tmp_path, torchscale_model, capsys
):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    out, ready = tmp_path / "out", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", STALL_AND_WAIT_TO_BE_KILLED, str(src), str(out), str(ready)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started = time.monotonic()
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() - started < 120, "the conversion did not get under way"
            time.sleep(0.1)
    finally:
        child.kill()  # SIGKILL: no cleanup can run
        child.wait()
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".out.converting-")]
    assert not out.exists() and len(staged) == 1 and any(staged[0].glob("*.safetensors"))
    stale = staged[0]
    assert f"-{child.pid}-" in stale.name  # the name records the process that owns it

    # what the next run must leave alone: a live process's staging folder, an older retnet-hf's (no pid), another
    # OUT's, a link named like a stale one (and what it points to), a file named like one
    keep = [
        tmp_path / stale.name.replace(f"-{child.pid}-", f"-{os.getpid()}-"),
        tmp_path / ".out.converting-k2x_9abc",
        tmp_path / stale.name.replace(".out.", ".other."),
    ]
    for folder in keep:
        folder.mkdir()
        (folder / "model.safetensors").write_text("not yours")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    link = tmp_path / stale.name.replace(f"-{child.pid}-", f"-{child.pid}1-")
    link.symlink_to(target, target_is_directory=True)
    a_file = tmp_path / stale.name.replace(f"-{child.pid}-", f"-{child.pid}2-")
    a_file.write_text("a file")

    assert main(["convert", "--from", "syncdoth", str(src), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale}, the staging folder of an interrupted conversion into out (process {child.pid})" in err
    assert f"left {keep[0]} alone: another conversion into out (process {os.getpid()}) seems to be running" in err
    assert f"left {keep[1]} alone" in err
    assert not stale.exists() and (out / "model.safetensors").is_file()
    assert all((folder / "model.safetensors").read_text() == "not yours" for folder in keep)
    assert link.is_symlink() and (target / "precious.txt").read_text() == "mine" and a_file.read_text() == "a file"
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.converting-") and p not in keep + [link, a_file]
    ]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_output_folder_gets_the_mode_mkdir_gives(tmp_path, torchscale_model, umask):
    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    previous = os.umask(umask)
    try:
        out = convert_checkpoint("syncdoth", src, tmp_path / "out")
        (tmp_path / "reference").mkdir()
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "reference").stat().st_mode) == 0o777 & ~umask, oct(mode)


@pytest.mark.parametrize("damage", ["nan", "inf", "int8"])
def test_a_weight_that_is_not_finite_floating_point_stops_the_conversion(tmp_path, torchscale_model, capsys, damage):
    from safetensors.torch import load_file, save_file

    decoder, fields = torchscale_model
    src = write_syncdoth_folder(decoder, fields, tmp_path / "syncdoth", shards=1)
    (weights,) = src.glob("*.safetensors")
    state = load_file(weights)
    name = "model.layers.0.retention.q_proj.weight"
    if damage == "int8":
        state[name] = state[name].to(torch.int8)
    else:
        state[name][0, :3] = float(damage)
    save_file(state, weights)
    out = tmp_path / "out"
    assert main(["convert", "--from", "syncdoth", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    expected = "floating-point weight belongs" if damage == "int8" else "3 of its"
    assert name in err and expected in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["syncdoth"]
