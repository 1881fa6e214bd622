"""RetNetCache as transformers' generic code sees it: the checks that transformers' generation tests
(`GenerationTesterMixin` in tests/generation/test_utils.py) make of a recurrent model's cache, written here for
RetNet because the package index's transformers sdist does not ship tests/generation.

From transformers 5.25 the cache is made of transformers' own recurrent layers (`LinearAttentionLayer`); before it
of a stand-in with the same attributes. Either way: one layer per decoder layer, holding `S` `[B, H, D, Dv]` and
`scale` `[B, H]` in float32 and the token count; generate()'s returned cache (greedy, beam) holds the state of all
but the last token; continuing from it, from input ids or from embeddings, equals generating in one go.
"""

import pytest
import torch
from transformers.cache_utils import Cache

from retnet_hf import RetNetCache
from retnet_hf.model.modeling_retnet import NATIVE_RECURRENT_CACHE, LinearAttentionLayer

from conftest import cache_of, random_ids, tiny_config, tiny_model


CONFIG = tiny_config()
HEADS = CONFIG.decoder_retention_heads
KEY, VALUE = CONFIG.decoder_embed_dim // HEADS, CONFIG.decoder_value_embed_dim // HEADS


def model64():
    model = tiny_model(torch.float64)
    model.generation_config.eos_token_id = None
    return model


def check_cache(cache, batch: int, seen: int, dtype=torch.float32):
    """What transformers' generation tests check of a recurrent cache (`_check_past_key_values_for_generate`)."""
    assert isinstance(cache, RetNetCache) and isinstance(cache, Cache)
    assert len(cache.layers) == len(cache) == CONFIG.decoder_layers
    for index, layer in enumerate(cache.layers):
        assert isinstance(layer, LinearAttentionLayer)  # transformers' own class from 5.25 on
        state, scale = layer.recurrent_states[0], layer.recurrent_states[1]
        assert state.shape == (batch, HEADS, KEY, VALUE) and scale.shape == (batch, HEADS)
        assert state.dtype == scale.dtype == dtype
        assert cache.get_seq_length(index) == seen
    if NATIVE_RECURRENT_CACHE:
        assert cache.is_linear == [True] * CONFIG.decoder_layers  # generate() builds no 4D masks for it


@pytest.mark.parametrize("batch,length", [(3, 7), (1, 1), (2, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_forward_fills_one_recurrent_layer_per_decoder_layer(batch, length, dtype):
    """`test_past_key_values_format`: the state is float32 whatever the model's dtype (float64 stays float64)."""
    model = tiny_model(dtype)
    cache = cache_of(model(random_ids(batch, length), use_cache=True))
    check_cache(cache, batch, length, torch.promote_types(dtype, torch.float32))
    assert cache_of(model(random_ids(batch, length), use_cache=False)) is None


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_returns_the_cache_of_its_sequences(num_beams):
    """`test_greedy_generate_dict_outputs_use_cache`, `test_beam_search_generate_dict_outputs_use_cache`: the cache
    in generate()'s output has one row per beam and has seen every token but the last."""
    model = model64()
    ids = random_ids(2, 6)
    kwargs = dict(
        max_new_tokens=5,
        num_beams=num_beams,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        output_hidden_states=True,
    )
    out = model.generate(ids, use_cache=True, **kwargs)
    check_cache(cache_of(out), 2 * num_beams, out.sequences.shape[1] - 1, torch.float64)
    assert len(out.scores) == len(out.logits) == 5
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cache_of(uncached) is None
    assert torch.equal(uncached.sequences, out.sequences)


@torch.no_grad()
def test_generate_continues_from_its_returned_cache():
    """`test_generate_continue_from_past_key_values`: 3 tokens, then 1 more from the returned cache (the attention
    mask grown by the tokens generated), equals 4 tokens in one call, states included."""
    model = model64()
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    grown = torch.ones_like(first.sequences)
    then = model.generate(
        first.sequences,
        attention_mask=grown,
        cache=cache_of(first),
        max_new_tokens=1,
        do_sample=False,
        return_dict_in_generate=True,
    )
    assert torch.equal(then.sequences, whole.sequences)
    for (s, scale), (s_ref, scale_ref) in zip(cache_of(then).states, cache_of(whole).states):
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_generate_continues_from_embeddings_and_its_returned_cache():
    """`test_generate_continue_from_inputs_embeds`: generate from embeddings, then continue with the embeddings of
    the prompt and of what was generated, and the returned cache: the tokens of one longer call."""
    model = model64()
    embeds = model.get_input_embeddings()(random_ids(2, 6))
    whole = model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    first = model.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    continued_embeds = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], dim=1)
    then = model.generate(inputs_embeds=continued_embeds, cache=cache_of(first), max_new_tokens=2, do_sample=False)
    assert torch.equal(torch.cat([first.sequences, then], dim=1), whole)


@pytest.mark.skipif(not NATIVE_RECURRENT_CACHE, reason="static state addresses come with transformers 5.25's layers")
@torch.no_grad()
def test_the_states_keep_their_addresses_across_decode_steps():
    """A compiled decode step (CUDA graphs) needs the state tensors it reads and writes to stay where they are:
    each step updates them in place, as transformers' recurrent layers expect."""
    model = tiny_model()
    cache = cache_of(model(random_ids(2, 9), use_cache=True))
    addresses = [[layer.recurrent_states[i].data_ptr() for i in (0, 1)] for layer in cache.layers]
    for t in range(3):
        model(random_ids(2, 1, seed=t), cache=cache)
    assert [[layer.recurrent_states[i].data_ptr() for i in (0, 1)] for layer in cache.layers] == addresses
    assert cache.get_seq_length() == 12
