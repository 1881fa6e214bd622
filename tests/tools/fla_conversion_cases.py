"""flash-linear-attention's own RetNet (`fla.models.RetNetForCausalLM`, fla 0.6.0) against its conversion.

Run only in a child process, through `run_interpreted` (tests/conftest.py), where fla's Triton kernels run on the CPU
in Triton's interpreter (the plugin tests/fla_interpreter.py); test_conversion.py's
`test_fla_model_saved_by_fla_converts_to_its_logits_and_greedy_tokens` starts it. Not named test_*: the main run
does not collect it.

A tiny fla model with random weights is saved by fla's `save_pretrained`, converted with `retnet-hf convert --from
fla`, and loaded as retnet_hf's model; the two are compared in float32 (the interpreter is wrong in float64):
logits in each of fla's attention modes (`attn_mode`), with left padding, through the caches step by step, and
greedy tokens against a decoding loop over fla's cache written here (fla's `generate()` is not used: under
transformers >= 5.24 its forward ignores the `cache=` argument that `generate` passes).

fla's layer picks its kernel from the input, not only from `attn_mode`: without gradients, a call of at most 64
tokens runs `fused_recurrent` whatever the mode. The mode checks therefore feed more than 64 tokens, and a spy on
the kernels checks that the mode's own kernel ran.
"""

from pathlib import Path

import fla.layers.multiscale_retention as fla_retention
import pytest
import torch
from fla.models import RetNetConfig as FlaConfig
from fla.models import RetNetForCausalLM as FlaForCausalLM
from safetensors import safe_open

import retnet_hf
from retnet_hf.cli import main

from conftest import cache_of, random_ids, relative_difference


VOCAB, PAD = 64, 0
TOLERANCE = 1e-5  # float32; about 1e-6 measured
# fla's config fields of the tiny model: d 32, value dim 48 (24 per head), 2 layers, 2 heads (key head dim 16).
# fuse_cross_entropy=False: fla's fused loss refuses CPU tensors ("Only support CUDA/NPU/XPU tensors").
FLA_FIELDS = dict(
    hidden_size=32,
    expand_v=1.5,
    num_hidden_layers=2,
    num_heads=2,
    vocab_size=VOCAB,
    fuse_cross_entropy=False,
)
VARIANTS = {
    "default": {},
    "unfused norms": dict(fuse_norm=False),
    "tied embeddings": dict(tie_word_embeddings=True),
}
# attn_mode -> the kernel fla's MultiScaleRetention calls for it
KERNELS = {
    "chunk": "chunk_retention",
    "fused_chunk": "fused_chunk_retention",
    "parallel": "parallel_retention",
    "fused_recurrent": "fused_recurrent_retention",
}
LONG = 67  # > 64 tokens: fla runs the mode's kernel (a chunk of 64 and a short one)


def build_fla(overrides: dict, seed=0) -> FlaForCausalLM:
    """fla's model with random float32 weights at a scale where the logits spread (fla's own initialisation gives
    near-uniform ones): embeddings N(0, 0.3^2) (larger ones make a tied model repeat its last token), projections
    N(0, 1/fan_in), norm weights around 1."""
    torch.manual_seed(seed)
    model = FlaForCausalLM(FlaConfig(**FLA_FIELDS, **overrides))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # a tied lm_head is the embedding, listed once
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name:
                parameter.copy_(1 + 0.3 * noise)
            elif "embeddings" in name:
                parameter.copy_(0.3 * noise)
            else:
                parameter.copy_(noise * parameter.shape[1] ** -0.5)
    return model.float().eval()


class Converted:
    def __init__(self, variant: str, folder: Path):
        self.variant, self.src, self.out = variant, folder / "fla", folder / "converted"
        build_fla(VARIANTS[variant]).save_pretrained(self.src)  # fla's own save
        assert main(["convert", "--from", "fla", str(self.src), str(self.out)]) == 0
        self.ours = retnet_hf.RetNetForCausalLM.from_pretrained(self.out).eval()

    def fla(self, **overrides) -> FlaForCausalLM:
        """fla's model loaded back from the folder it saved (`attn_mode=...` to choose the mode)."""
        return FlaForCausalLM.from_pretrained(self.src, **overrides).eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tensors this small gain nothing from threads, and a second one waiting on a busy core made the run about 3x
    slower (conftest's `torch_threads_kept` restores the count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request, tmp_path_factory):
    return Converted(request.param, tmp_path_factory.mktemp(request.param.replace(" ", "_")))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of fla's retention kernels, in call order."""
    calls = []
    for name in KERNELS.values():
        kernel = getattr(fla_retention, name)

        def spy(*args, _kernel=kernel, _name=name, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(fla_retention, name, spy)
    return calls


def left_padded(ids: torch.Tensor, pads=(3, 0)):
    """`ids` with the first `pads[i]` tokens of row i replaced by padding, and the attention mask."""
    mask = torch.ones_like(ids)
    for row, count in enumerate(pads):
        mask[row, :count] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_fla_saved_the_variant_and_it_converts_to_the_matching_config(converted):
    with safe_open(converted.src / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    gate_norm = "g_norm" if converted.variant == "unfused norms" else "g_norm_swish_gate"
    assert f"model.layers.0.attn.{gate_norm}.weight" in names, sorted(names)
    tied = converted.variant == "tied embeddings"
    assert ("lm_head.weight" in names) is not tied  # fla's save leaves the tied head out
    config = converted.ours.config
    assert config.share_decoder_input_output_embed is tied
    assert (converted.ours.lm_head.weight.data_ptr() == converted.ours.model.embed_tokens.weight.data_ptr()) is tied
    assert (config.rotary_style, config.retention_normalization) == ("neox", False)
    assert converted.ours.dtype == torch.float32


@pytest.mark.parametrize("mode", list(KERNELS))
@torch.no_grad()
def test_logits_in_every_attention_mode(converted, mode, kernel_calls):
    fla = converted.fla(attn_mode=mode)
    assert fla.config.attn_mode == mode and all(layer.attn.mode == mode for layer in fla.model.layers)
    ids = random_ids(2, LONG, seed=2, vocab=VOCAB)
    reference = fla(ids, labels=ids, use_cache=False)
    assert kernel_calls == [KERNELS[mode]] * 2, kernel_calls  # the mode's own kernel, in each layer
    assert reference.logits.std() > 0.5  # logits that spread: a wrong weight would show
    ours = converted.ours(ids, labels=ids)
    assert relative_difference(ours.logits, reference.logits) < TOLERANCE
    assert relative_difference(ours.loss, reference.loss) < TOLERANCE  # both: next-token cross-entropy, the mean


# The variants differ outside retention (norms, head), so the padded kernels are checked with one of them.
@pytest.mark.parametrize("converted", ["default"], indirect=True)
@pytest.mark.parametrize("mode", list(KERNELS))
@torch.no_grad()
def test_left_padded_logits_in_every_attention_mode(converted, mode, kernel_calls):
    """fla drops the padding (its variable-length kernels, positions from each row's first real token); ours
    keeps it out of the state."""
    fla = converted.fla(attn_mode=mode)
    ids, mask = left_padded(random_ids(2, LONG + 3, seed=2, vocab=VOCAB))
    reference = fla(ids, attention_mask=mask, use_cache=False).logits
    assert kernel_calls == [KERNELS[mode]] * 2, kernel_calls
    real = mask.bool()
    logits = converted.ours(ids, attention_mask=mask).logits
    assert relative_difference(logits[real], reference[real]) < TOLERANCE


@pytest.mark.parametrize(
    "converted, prompt",
    [("default", 5), ("unfused norms", 5), ("tied embeddings", 5), ("default", LONG)],
    indirect=["converted"],
)
@torch.no_grad()
def test_cached_decoding_step_by_step(converted, prompt, kernel_calls):
    """A left-padded prompt into each model's cache (fla runs `fused_recurrent` for 5 tokens, its default mode's
    `chunk` for 67), then one token per call through the caches: the logits of every call."""
    fla = converted.fla()
    ids, mask = left_padded(random_ids(2, prompt + 5, seed=3, vocab=VOCAB))
    fla_out = fla(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    ours_out = converted.ours(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    assert kernel_calls == ["fused_recurrent_retention" if prompt <= 64 else "chunk_retention"] * 2, kernel_calls
    real = mask[:, :prompt].bool()
    assert relative_difference(ours_out.logits[real], fla_out.logits[real]) < TOLERANCE
    fla_cache, our_cache = fla_out.past_key_values, cache_of(ours_out)
    for t in range(prompt, ids.shape[1]):
        fla_out = fla(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=fla_cache, use_cache=True)
        ours_out = converted.ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=our_cache, use_cache=True)
        fla_cache, our_cache = fla_out.past_key_values, cache_of(ours_out)
        assert relative_difference(ours_out.logits, fla_out.logits) < TOLERANCE, t
    assert fla_cache.get_seq_length(0) == our_cache.num_tokens == ids.shape[1]


@torch.no_grad()
def fla_greedy(fla, ids, mask, new_tokens, eos):
    """Greedy decoding written over fla's cache, as transformers' greedy search does it: the prompt, then the
    argmax token fed back one per call; a row that has produced `eos` continues with padding."""
    out = fla(ids, attention_mask=mask, use_cache=True)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for step in range(new_tokens):
        following = out.logits[:, -1].argmax(-1).masked_fill(finished, PAD)
        finished |= following == eos
        ids = torch.cat([ids, following[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if finished.all() or step == new_tokens - 1:
            break
        out = fla(following[:, None], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return ids


@torch.no_grad()
def test_greedy_tokens_equal_fla_cached_loop(converted):
    fla = converted.fla()
    ids, mask = left_padded(random_ids(2, 6, seed=4, vocab=VOCAB), pads=(2, 0))
    new_tokens = 10
    expected = fla_greedy(fla, ids, mask, new_tokens, eos=converted.ours.generation_config.eos_token_id)
    ours = converted.ours.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=PAD
    )
    assert all(len(set(row.tolist())) > 2 for row in expected[:, ids.shape[1] :])  # not a repetition
    assert torch.equal(ours, expected), (ours, expected)
