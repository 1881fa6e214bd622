"""Generation and the recurrent cache: `generate()` with the state equals recomputing the whole prefix.

Covered: every decoding mode with and without the cache, one token per decode step, a state and a step cost that
do not grow with the context, continuing from a returned cache (by hand, through `generate`, chunked prefill),
left padding, packed rows, refused assisted decoding and cropping, streamers, stopping criteria, repetition
penalty, and the cache's row operations (beam search). Token sequences are compared exactly on float64 models,
so no near-tie can flip a token.
"""

import copy
import threading

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation import BaseStreamer

from retnet_hf import CACHE_NAME, RetNetCache
from retnet_hf.model.modeling_retnet import NATIVE_RECURRENT_CACHE

from conftest import cache_of, random_ids, tiny_model


FORMS = ["parallel", "chunkwise", "recurrent"]
PRECISIONS = [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 1e-4, id="fp32")]
TIGHT = dict(rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- helpers


def prompt(batch=1, length=7, seed=0):
    return random_ids(batch, length, seed)


def model64(**overrides):
    """A float64 tiny model whose generation never stops at EOS, so every sequence has its full length."""
    model = tiny_model(torch.float64, **overrides)
    model.generation_config.eos_token_id = None
    return model


def generate(model, ids, seed=None, **kwargs):
    """`model.generate`, with the global RNG seeded first when `seed` is given (sampling)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(ids, **kwargs)


def state_shapes(cache):
    return [tuple(t.shape) for state in cache.states for t in state]


def continue_logits(model, cache, next_ids, mask=None, form=None):
    """Logits of `next_ids` fed after a copy of `cache` (with the grown attention mask when `mask` is given)."""
    cache = copy.deepcopy(cache)
    if mask is not None:
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
    return model(next_ids, attention_mask=mask, cache=cache, retention_form=form).logits


class RecordDecoderInputs:
    """A forward pre-hook on the backbone recording each call's input length and the cache it was given."""

    def __init__(self, model):
        self.lengths, self.caches = [], []
        self.handle = model.model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self.lengths.append((ids if ids is not None else embeds).shape[1])
        self.caches.append(kwargs.get("cache"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def left_pad(prompts, pad_token_id=0):
    """Left-pad 1D prompts into `(ids [B, W], attention_mask [B, W])`."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def ragged_prompts(lengths=(3, 11, 7)):
    """Prompts of different lengths (with chunk size 4 the padding ends inside a chunk)."""
    return [prompt(length=n, seed=10 + i)[0] for i, n in enumerate(lengths)]


def pack(documents):
    """Concatenate 1D documents into one row with position ids restarting at 0 (TRL's padding-free packing)."""
    ids = torch.cat(documents)
    position_ids = torch.cat([torch.arange(len(d)) for d in documents])
    return ids, position_ids


# ------------------------------------------------------------------------- 1. cache == recomputing the prefix

DECODING = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.7),
    "sampling_hot": dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.5),
    "sampling_num_return_sequences": dict(do_sample=True, top_k=10, temperature=1.2, num_return_sequences=3),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_num_return_sequences": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "greedy_repetition_penalty": dict(do_sample=False, repetition_penalty=1.5),
    "sampling_repetition_penalty": dict(do_sample=True, top_k=20, repetition_penalty=1.5),
}


@pytest.mark.parametrize("mode", DECODING)
def test_generate_with_cache_equals_without(mode):
    model = model64()
    ids = prompt(batch=2, length=6)
    kwargs = dict(
        DECODING[mode], max_new_tokens=10, return_dict_in_generate=True, output_logits=True, output_scores=True
    )
    cached = generate(model, ids, seed=123, **kwargs)
    recomputed = generate(model, ids, seed=123, use_cache=False, **kwargs)

    rows = 2 * DECODING[mode].get("num_return_sequences", 1)
    assert cached.sequences.shape == (rows, 6 + 10)
    assert torch.equal(cached.sequences[:, :6], ids.repeat_interleave(rows // 2, dim=0))
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert isinstance(cache_of(cached), RetNetCache)
    assert cache_of(recomputed) is None
    assert len(cached.logits) == len(cached.scores) == 10
    for outputs in ("logits", "scores"):  # raw and processed logits of every step
        for a, b in zip(getattr(cached, outputs), getattr(recomputed, outputs)):
            torch.testing.assert_close(a, b, **TIGHT)
    if "num_beams" in DECODING[mode]:
        assert cached.sequences_scores is not None
        torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores, **TIGHT)


def test_sampling_depends_on_the_seed_and_not_on_the_cache():
    """Guards the sampling comparisons above: different seeds do give different samples."""
    model = model64()
    ids = prompt(batch=2, length=6)
    kwargs = dict(DECODING["sampling_hot"], max_new_tokens=10)
    first = generate(model, ids, seed=1, **kwargs)
    assert not torch.equal(first, generate(model, ids, seed=2, **kwargs))
    assert torch.equal(first, generate(model, ids, seed=1, use_cache=False, **kwargs))


# ------------------------------------------------------------------------------ 2. one token per decode step


@pytest.mark.parametrize("num_beams", [1, 3])
def test_each_decode_step_feeds_exactly_one_token(num_beams):
    model = model64()
    ids = prompt(batch=2, length=9)
    with RecordDecoderInputs(model) as calls:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, num_beams=num_beams, return_dict_in_generate=True)
    assert calls.lengths == [9] + [1] * 5  # the prompt once, then one token per new token (the last is not fed)
    cache = cache_of(out)
    assert isinstance(cache, RetNetCache)
    assert calls.caches[0] is None or calls.caches[0] is cache
    assert all(c is cache for c in calls.caches[1:])  # one cache object, updated in place
    assert cache.get_seq_length() == sum(calls.lengths) == 9 + 6 - 1
    assert state_shapes(cache)[0][0] == 2 * num_beams


def test_no_cache_generation_recomputes_the_prefix():
    """`use_cache=False` really is the reference: each step sees the whole sequence so far."""
    model = model64()
    with RecordDecoderInputs(model) as calls:
        model.generate(prompt(length=5), max_new_tokens=4, do_sample=False, use_cache=False)
    assert calls.lengths == [5, 6, 7, 8]
    assert calls.caches == [None] * 4


# ------------------------------------------------------------------------- 3. constant state, constant cost


def decode_step(model, context_length):
    """Generate after a prompt of `context_length` tokens; return the state shapes and one decode step's FLOPs."""
    ids = prompt(length=context_length, seed=context_length)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = cache_of(out)
    assert cache.get_seq_length() == context_length + 2
    shapes = state_shapes(cache)
    with FlopCounterMode(display=False) as counter:
        model(out.sequences[:, -1:], cache=cache, use_cache=True)
    return shapes, counter.get_total_flops()


def test_state_size_and_step_cost_do_not_depend_on_the_context():
    model = model64()
    short_shapes, short_flops = decode_step(model, 10)
    long_shapes, long_flops = decode_step(model, 200)
    config = model.config
    heads = config.decoder_retention_heads
    key_dim, value_dim = config.decoder_embed_dim // heads, config.decoder_value_embed_dim // heads
    assert short_shapes == long_shapes == [(1, heads, key_dim, value_dim), (1, heads)] * config.decoder_layers
    assert short_flops == long_flops > 0


# ------------------------------------------------------------------------------ 4. continuing from a cache


@pytest.mark.parametrize("pieces", [(1,) * 9, (3, 1, 5), (9,)], ids=["one_by_one", "3_1_5", "all_at_once"])
@pytest.mark.parametrize("form", [None] + FORMS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_returned_cache_continues_exactly(pieces, form, with_mask):
    model = tiny_model(torch.float64, recurrent_chunk_size=4)
    ids = prompt(batch=2, length=7 + sum(pieces))
    full = model(ids, retention_form="parallel").logits

    out = model(ids[:, :7], use_cache=True, retention_form=form)
    cache, logits, seen = cache_of(out), [out.logits], 7
    for n in pieces:
        mask = torch.ones(2, seen + n, dtype=torch.long) if with_mask else None
        step = model(ids[:, seen : seen + n], attention_mask=mask, cache=cache, retention_form=form)
        assert cache_of(step) is cache
        seen += n
        assert cache.get_seq_length() == seen
        logits.append(step.logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full, **TIGHT)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad_enabled"])
def test_a_copied_cache_is_independent(grad):
    """`copy.deepcopy` (what `crop`'s error recommends) gives a state that continues on its own, also for a cache
    made by a plain `model(...)` call outside `torch.no_grad()`."""
    model = tiny_model(torch.float64)
    ids = prompt(batch=2, length=12)
    with torch.no_grad():
        full = model(ids).logits
    with torch.set_grad_enabled(grad):
        cache = cache_of(model(ids[:, :8], use_cache=True))
        saved = copy.deepcopy(cache)
        model(prompt(batch=2, length=3, seed=9), cache=cache)  # move the original elsewhere
        torch.testing.assert_close(model(ids[:, 8:], cache=saved).logits, full[:, 8:], **TIGHT)
    assert saved.get_seq_length() == 12 and cache.get_seq_length() == 11


@pytest.mark.parametrize("prefix_short_by", [1, 3])
def test_generate_continues_from_a_prefilled_cache(prefix_short_by):
    """generate(full prompt, cache=cache of a prefix) feeds only the rest and equals a fresh run."""
    model = model64()
    ids = prompt(batch=2, length=10)
    fresh = model.generate(ids, max_new_tokens=6, do_sample=False)
    cache = cache_of(model(ids[:, :-prefix_short_by], use_cache=True))
    with RecordDecoderInputs(model) as calls:
        continued = model.generate(ids, **{CACHE_NAME: cache}, max_new_tokens=6, do_sample=False)
    assert calls.lengths == [prefix_short_by] + [1] * 5
    assert torch.equal(continued, fresh)


@pytest.mark.parametrize("new_user_tokens", [0, 4])
def test_generate_continues_from_its_returned_cache(new_user_tokens):
    """A second generate() on the first one's output and cache (plus new tokens, as in a chat) equals one run."""
    model = model64()
    ids = prompt(batch=2, length=6)
    first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    user = prompt(batch=2, length=new_user_tokens, seed=5)
    history = torch.cat([first.sequences, user], dim=1)
    reference = model.generate(history, max_new_tokens=4, do_sample=False, use_cache=False)
    with RecordDecoderInputs(model) as calls:
        second = model.generate(
            history,
            **{CACHE_NAME: cache_of(first)},
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert calls.lengths[0] == 1 + new_user_tokens  # only what the cache has not seen
    assert torch.equal(second.sequences, reference)
    assert cache_of(second).get_seq_length() == history.shape[1] + 3


def test_generate_from_inputs_embeds_equals_from_input_ids():
    model = model64()
    ids = prompt(batch=2, length=10)
    reference = model.generate(ids, max_new_tokens=6, do_sample=False)
    with RecordDecoderInputs(model) as calls:
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert calls.lengths == [10] + [1] * 5
    assert torch.equal(from_embeds, reference[:, 10:])  # only the new tokens come back


@pytest.mark.parametrize("explicit_cache", [True, False], ids=["given_cache", "default_cache"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_equals_one_prefill(explicit_cache, padded):
    """`prefill_chunk_size` feeds the prompt in pieces of several tokens on top of a state."""
    model = model64(recurrent_chunk_size=4)
    if padded:
        ids, mask = left_pad(ragged_prompts())
    else:
        ids, mask = prompt(batch=2, length=10), None
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = RetNetCache(model.config.decoder_layers) if explicit_cache else None
    with RecordDecoderInputs(model) as calls:
        chunked = model.generate(
            ids, attention_mask=mask, **{CACHE_NAME: cache}, prefill_chunk_size=3, max_new_tokens=6, do_sample=False
        )
    assert calls.lengths[:3] == [3, 3, 3] and calls.lengths[-5:] == [1] * 5
    assert sum(calls.lengths) == ids.shape[1] + 5
    assert torch.equal(chunked, reference)


# ------------------------------------------------------------------------------------------ 5. left padding


def with_pad_embedding(model, pad_embedding):
    """`"zero"`: the pad row as initialised (padding_idx); `"random"`: a non-zero pad row, as a checkpoint may
    have, so that only the attention mask can keep padding out of the state."""
    if pad_embedding == "random":
        with torch.no_grad():
            row = model.get_input_embeddings().weight[model.config.pad_token_id]
            row.copy_(torch.randn(row.shape, generator=torch.Generator().manual_seed(4), dtype=row.dtype))
    return model


@pytest.mark.parametrize("pad_embedding", ["zero", "random"])
@pytest.mark.parametrize("positions", ["from_mask", "arange"])
def test_left_padded_batch_generates_as_each_prompt_alone(pad_embedding, positions):
    """`positions="from_mask"`: generate() derives position_ids from the mask (0 on the pads, so they restart at the
    first real token); `"arange"`: explicit 0..W-1 on every row, where only the attention mask can hide the pads."""
    model = with_pad_embedding(model64(recurrent_chunk_size=4), pad_embedding)
    prompts = ragged_prompts()
    ids, mask = left_pad(prompts)
    kwargs = dict(do_sample=False, max_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    position_ids = torch.arange(ids.shape[1]).expand_as(ids) if positions == "arange" else None
    batch = model.generate(ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    width = ids.shape[1]
    recomputed = model.generate(ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **kwargs)
    assert torch.equal(batch.sequences, recomputed.sequences)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kwargs)
        assert torch.equal(batch.sequences[row, width - len(p) :], alone.sequences[0]), f"row {row}"
        assert (batch.sequences[row, : width - len(p)] == 0).all()
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            torch.testing.assert_close(step_batch[row : row + 1], step_alone, **TIGHT)


@pytest.mark.parametrize("pad_embedding", ["zero", "random"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype, tol", PRECISIONS)
@torch.no_grad()
def test_left_padded_logits_and_states_equal_unpadded(form, dtype, tol, pad_embedding):
    """Logits at the real positions, and what the final state gives the next tokens, are those of each prompt
    alone. (The states themselves differ by a rotation, as keys are rotated by absolute position; only their
    effect is compared, and the scale part, which is rotation free.)"""
    model = with_pad_embedding(tiny_model(dtype, recurrent_chunk_size=4), pad_embedding)
    prompts = ragged_prompts()
    ids, mask = left_pad(prompts)
    nxt = prompt(batch=len(prompts), length=3, seed=99)
    out = model(ids, attention_mask=mask, retention_form=form, use_cache=True)
    after = continue_logits(model, cache_of(out), nxt, mask=mask, form=form)
    width = ids.shape[1]
    for row, p in enumerate(prompts):
        alone = model(p[None], retention_form=form, use_cache=True)
        real = slice(width - len(p), None)
        torch.testing.assert_close(out.logits[row : row + 1, real], alone.logits, rtol=tol, atol=tol)
        for (_, scale), (_, alone_scale) in zip(cache_of(out).states, cache_of(alone).states):
            torch.testing.assert_close(scale[row : row + 1], alone_scale, rtol=tol, atol=tol)
        alone_after = continue_logits(model, cache_of(alone), nxt[row : row + 1], form=form)
        torch.testing.assert_close(after[row : row + 1], alone_after, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ 6. packed rows

DOCUMENT_LENGTHS = [(5, 11, 7), (9, 14)]  # with chunk size 8: starts inside a chunk and on a chunk boundary


def documents(lengths, seed=20):
    return [prompt(length=n, seed=seed + i)[0] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype, tol", PRECISIONS)
@torch.no_grad()
def test_packed_row_equals_separate_documents(form, dtype, tol):
    """One packed row, position_ids [1, T] and no attention mask, as TRL's padding-free collator sends it."""
    model = tiny_model(dtype, recurrent_chunk_size=8)
    docs = documents(DOCUMENT_LENGTHS[0])
    ids, position_ids = pack(docs)
    out = model(ids[None], position_ids=position_ids[None], retention_form=form, use_cache=True)
    start = 0
    for doc in docs:
        alone = model(doc[None], retention_form=form, use_cache=True)
        torch.testing.assert_close(out.logits[:, start : start + len(doc)], alone.logits, rtol=tol, atol=tol)
        start += len(doc)
    # the state after the row acts as the last document's state alone: earlier documents left nothing in it
    nxt = prompt(length=4, seed=99)
    torch.testing.assert_close(
        continue_logits(model, cache_of(out), nxt, form=form),
        continue_logits(model, cache_of(alone), nxt, form=form),
        rtol=tol,
        atol=tol,
    )


@pytest.mark.parametrize("form", FORMS)
def test_packed_batch_with_different_layouts_per_row(form):
    model = tiny_model(torch.float64, recurrent_chunk_size=8)
    rows = [documents(lengths, seed=30 + 10 * r) for r, lengths in enumerate(DOCUMENT_LENGTHS)]
    packed = [pack(docs) for docs in rows]
    assert len({len(ids) for ids, _ in packed}) == 1
    ids = torch.stack([ids for ids, _ in packed])
    position_ids = torch.stack([pos for _, pos in packed])
    logits = model(ids, position_ids=position_ids, retention_form=form).logits
    for r, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone = model(doc[None], retention_form=form).logits[0]
            torch.testing.assert_close(logits[r, start : start + len(doc)], alone, **TIGHT)
            start += len(doc)


# ------------------------------------------------ 7. rolling a state back: assisted decoding, prompt lookup, crop

native = pytest.mark.skipif(
    not NATIVE_RECURRENT_CACHE,
    reason=f"transformers {transformers.__version__} cannot roll a recurrent state back (5.25+ can; the refusal "
    "before it is tested below and, as remote code, under 4.48 and 5.24 in test_transformers_versions.py)",
)
legacy = pytest.mark.skipif(
    NATIVE_RECURRENT_CACHE,
    reason=f"transformers {transformers.__version__} rolls recurrent states back (the refusal is for releases "
    "before 5.25; tested as remote code under 4.48 and 5.24 in test_transformers_versions.py)",
)


def draft_model():
    """A smaller RetNet with the same vocabulary: the assistant."""
    return model64(seed=1, decoder_layers=1, decoder_embed_dim=16, decoder_value_embed_dim=32)


def repetitive_prompt(length=15):
    """A prompt that repeats itself, so that prompt lookup finds drafts and some of them are accepted."""
    return torch.arange(5, 10).repeat(length // 5 + 1)[:length][None]


@native
@pytest.mark.parametrize("num_assistant_tokens", [1, 3, 6])
@pytest.mark.parametrize("prompt_length", [1, 7, 19])
def test_assisted_greedy_equals_plain_greedy(num_assistant_tokens, prompt_length):
    model, assistant = model64(), draft_model()
    assistant.generation_config.num_assistant_tokens = num_assistant_tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    ids = prompt(length=prompt_length)
    plain = model.generate(ids, max_new_tokens=16, do_sample=False)
    with RecordDecoderInputs(model) as calls:
        assisted = model.generate(ids, assistant_model=assistant, max_new_tokens=16, do_sample=False)
    assert torch.equal(assisted, plain)
    assert max(calls.lengths[1:]) > 1  # drafts were verified several tokens at a time, and some rolled back


@native
@pytest.mark.parametrize("lookup", [2, 5])
def test_prompt_lookup_greedy_equals_plain_greedy(lookup):
    model = model64()
    for ids in (repetitive_prompt(), prompt(length=12)):
        plain = model.generate(ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(
            model.generate(ids, prompt_lookup_num_tokens=lookup, max_new_tokens=20, do_sample=False), plain
        )


@native
@pytest.mark.parametrize("way", ["assistant", "prompt_lookup"])
def test_assisted_sampling_is_seeded_and_its_cache_continues_exactly(way):
    """Speculative sampling differs from plain sampling by design; it is reproducible, and the cache it returns holds
    exactly the state of the tokens it returns (continuing from it equals recomputing them)."""
    model = model64()
    extra = dict(assistant_model=draft_model()) if way == "assistant" else dict(prompt_lookup_num_tokens=3)
    ids = repetitive_prompt()
    kwargs = dict(do_sample=True, top_k=10, max_new_tokens=12, return_dict_in_generate=True, **extra)
    first, again = generate(model, ids, seed=3, **kwargs), generate(model, ids, seed=3, **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    cache = cache_of(first)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token is not fed yet
    assert cache.states_to_keep() == 0 and cache.is_compileable  # it records no more
    continued = model.generate(first.sequences, cache=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(continued, model.generate(first.sequences, max_new_tokens=6, do_sample=False, use_cache=False))


@native
def test_assisted_greedy_returns_a_cache_that_continues_exactly():
    model = model64()
    ids = prompt(length=9)
    out = model.generate(
        ids, assistant_model=draft_model(), max_new_tokens=10, do_sample=False, return_dict_in_generate=True
    )
    reference = model(out.sequences[:, :-1]).logits
    history = model(out.sequences[:, -1:], cache=copy.deepcopy(cache_of(out))).logits
    torch.testing.assert_close(history[:, -1], model(out.sequences).logits[:, -1], **TIGHT)
    assert cache_of(out).get_seq_length() == reference.shape[1]


@native
def test_assisted_batches_are_refused_by_the_release():
    """transformers 5.25's assisted decoding takes one prompt at a time; left-padded batches go through plain
    generate()."""
    ids, mask = left_pad(ragged_prompts())
    with pytest.raises(ValueError, match="batch_size = 1"):
        model64().generate(ids, attention_mask=mask, prompt_lookup_num_tokens=2, max_new_tokens=4, do_sample=False)


@native
@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_crop_returns_to_the_state_before_the_last_tokens(form):
    """A recording cache keeps the states after each of the last `keep` tokens of a forward (and of each step);
    crop(-n) returns to the state before the last n, exactly, and frees the record."""
    model = model64()
    ids = prompt(batch=1, length=13)
    cache = cache_of(model(ids[:, :5], use_cache=True))
    cache.activate_past_recording(recurrent_states_to_keep=4)
    assert cache.states_to_keep() == 4 and not cache.is_compileable
    model(ids[:, 5:11], cache=cache, retention_form=form)  # 6 tokens: the states after the last 4 are recorded
    model(ids[:, 11:12], cache=cache)  # a step records the one before it
    assert all(len(layer.recurrent_states_history[i]) == 4 for layer in cache.layers for i in (0, 1))
    with pytest.raises(ValueError, match="at most as many as it recorded"):
        copy.deepcopy(cache).crop(-5)
    for n in range(5):
        cropped = copy.deepcopy(cache)
        cropped.crop(-n)
        assert cropped.get_seq_length() == 12 - n
        assert all(not history for layer in cropped.layers for history in layer.recurrent_states_history.values())
        expected = cache_of(model(ids[:, : 12 - n], use_cache=True))
        for (s, scale), (s_ref, scale_ref) in zip(cropped.states, expected.states):
            torch.testing.assert_close(s, s_ref, **TIGHT)
            torch.testing.assert_close(scale, scale_ref, **TIGHT)
        torch.testing.assert_close(
            model(ids[:, 12 - n : 13 - n], cache=cropped).logits[:, -1], model(ids[:, : 13 - n]).logits[:, -1], **TIGHT
        )


@native
def test_crop_is_refused_where_nothing_was_recorded():
    model = tiny_model()
    cache = cache_of(model(prompt(length=5), use_cache=True))
    for n in (-1, 3):
        with pytest.raises(ValueError, match="rolls back only by a negative number"):
            cache.crop(n)
    cache.activate_past_recording(recurrent_states_to_keep=2)
    with pytest.raises(ValueError, match="rolls back only by a negative number"):
        cache.crop(2)
    assert cache.get_seq_length() == 5  # untouched


@native
def test_the_recorded_past_is_bounded_by_the_draft_length():
    """Recording keeps `keep` states per layer however many tokens pass (a state costs its [H, D, Dv] and [H])."""
    model = model64()
    cache = cache_of(model(prompt(batch=1, length=3), use_cache=True))
    cache.activate_past_recording(recurrent_states_to_keep=3)
    model(prompt(batch=1, length=20, seed=4), cache=cache)
    for t in range(10):
        model(prompt(batch=1, length=1, seed=t), cache=cache)
    state_bytes = sum(t.numel() * t.element_size() for state in cache.states for t in state)
    recorded = sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for h in layer.recurrent_states_history.values()
        for t in h
    )
    assert recorded == 3 * state_bytes


@legacy
def test_rollback_is_refused_naming_the_release_that_can():
    model, assistant = model64(), model64(seed=1)
    for extra in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=3)):
        with pytest.raises(ValueError, match="needs transformers >= 5.25"):
            model.generate(prompt(), max_new_tokens=4, do_sample=False, **extra)
    cache = cache_of(model(prompt(length=5), use_cache=True))
    with pytest.raises(NotImplementedError, match="needs transformers >= 5.25"):
        cache.crop(-1)
    assert cache.is_croppable is False and cache.is_compileable is False
    assert cache.get_seq_length() == 5  # untouched


# ----------------------------------------------------------------- 8. streamers, stopping, logits processors


class TokenCollector(BaseStreamer):
    """Collects what generate() streams: first the prompt, then each new token."""

    def __init__(self):
        self.chunks, self.ended = [], 0

    def put(self, value):
        self.chunks.append(value.detach().clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("mode", ["greedy", "sampling", "greedy_repetition_penalty"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_streamer_receives_every_token_in_order(mode, use_cache):
    model = model64()
    ids = prompt(length=5)
    streamer = TokenCollector()
    out = generate(model, ids, seed=7, streamer=streamer, max_new_tokens=8, use_cache=use_cache, **DECODING[mode])
    assert torch.equal(streamer.chunks[0].reshape(ids.shape), ids)
    assert [chunk.numel() for chunk in streamer.chunks[1:]] == [1] * 8
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:]]), out[0, 5:])
    assert streamer.ended == 1


def word_tokenizer(vocab_size=64):
    """A tokenizer built locally: token i is the word `w{i}`."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2")


def test_text_iterator_streamer_yields_the_generated_text():
    model = model64()
    tokenizer = word_tokenizer()
    ids = prompt(length=5)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=model.generate(ids, streamer=streamer, max_new_tokens=8, do_sample=False))
    )
    thread.start()
    text = "".join(streamer)
    thread.join()
    generated = result["out"][0, 5:]
    assert len(generated) == 8
    assert text.split() == tokenizer.decode(generated).split() == [f"w{i}" for i in generated.tolist()]


class StopAfter(StoppingCriteria):
    """Stops once `n` tokens have been generated after a prompt of `prompt_length`."""

    def __init__(self, prompt_length, n):
        self.prompt_length, self.n = prompt_length, n

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] - self.prompt_length >= self.n
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("n", [1, 4])
def test_stopping_criterion_is_honoured(n):
    model = model64()
    ids = prompt(batch=2, length=6)
    unstopped = model.generate(ids, max_new_tokens=12, do_sample=False)
    with RecordDecoderInputs(model) as calls:
        stopped = model.generate(
            ids, max_new_tokens=12, do_sample=False, stopping_criteria=StoppingCriteriaList([StopAfter(6, n)])
        )
    assert stopped.shape == (2, 6 + n)
    assert torch.equal(stopped, unstopped[:, : 6 + n])
    assert len(calls.lengths) == n  # no forward pass after the criterion said stop


def test_repetition_penalty_changes_the_scores_identically_with_and_without_cache():
    model = model64()
    ids = prompt(batch=2, length=6)
    kwargs = dict(do_sample=False, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    plain = model.generate(ids, **kwargs)
    cached = model.generate(ids, repetition_penalty=1.5, **kwargs)
    recomputed = model.generate(ids, repetition_penalty=1.5, use_cache=False, **kwargs)
    assert not torch.allclose(plain.scores[0], cached.scores[0])  # the penalty is applied at all
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, **TIGHT)


# ----------------------------------------------------------------------- 9. beam search and the cache's rows


def test_beam_search_reorders_the_cache(monkeypatch):
    model = model64()
    ids = prompt(batch=2, length=6)
    kwargs = dict(num_beams=3, num_return_sequences=3, do_sample=False, max_new_tokens=8)
    reference = model.generate(ids, use_cache=False, **kwargs)

    calls = []
    original = RetNetCache.reorder_cache

    def spy(self, beam_idx):
        calls.append(beam_idx.clone())
        return original(self, beam_idx)

    monkeypatch.setattr(RetNetCache, "reorder_cache", spy)
    out = model.generate(ids, **kwargs)
    assert len(calls) >= 7 and all(idx.shape == (6,) for idx in calls)  # every step after the first, 2 x 3 rows
    assert any(not torch.equal(idx, torch.arange(6)) for idx in calls)  # beams did move between rows
    assert torch.equal(out, reference)

    # and the comparison is sensitive to it: a cache that ignores the reordering decodes something else
    monkeypatch.setattr(RetNetCache, "reorder_cache", lambda self, beam_idx: None)
    assert not torch.equal(model.generate(ids, **kwargs), reference)


@torch.no_grad()
def test_cache_row_operations_keep_each_row_state():
    model = tiny_model(torch.float64)
    ids, nxt = prompt(batch=3, length=6), prompt(batch=3, length=2, seed=5)
    reference = model(torch.cat([ids, nxt], dim=1)).logits[:, -2:]
    cache = cache_of(model(ids, use_cache=True))

    def continued(operation, *args, rows):
        copied = copy.deepcopy(cache)
        getattr(copied, operation)(*args)
        assert copied.get_seq_length() == 6
        return model(nxt[rows], cache=copied).logits

    repeat = torch.arange(3).repeat_interleave(2)
    torch.testing.assert_close(continued("batch_repeat_interleave", 2, rows=repeat), reference[repeat], **TIGHT)
    perm = torch.tensor([2, 0, 1, 1])
    torch.testing.assert_close(continued("reorder_cache", perm, rows=perm), reference[perm], **TIGHT)
    keep = torch.tensor([1])
    torch.testing.assert_close(continued("batch_select_indices", keep, rows=keep), reference[keep], **TIGHT)
    # the original cache was not touched by the operations on its copies
    torch.testing.assert_close(model(nxt, cache=cache).logits, reference, **TIGHT)


def test_cache_reset_starts_over():
    model = tiny_model(torch.float64)
    ids = prompt(batch=2, length=5)
    cache = cache_of(model(prompt(batch=2, length=9, seed=3), use_cache=True))
    cache.reset()
    assert cache.get_seq_length() == 0 and all(state is None for state in cache.states)
    torch.testing.assert_close(model(ids, cache=cache).logits, model(ids).logits, **TIGHT)
