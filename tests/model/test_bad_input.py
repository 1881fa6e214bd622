"""Inputs that would silently give a wrong model or wrong outputs are refused by name: config values of the wrong
type, misspelled config fields (a warning naming the field meant), attention masks that are not 0/1, and caches
made by another model."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from retnet_hf import RetNetCache, RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification

from conftest import (
    BLOCK_PACKAGE,
    TRANSFORMERS_448_ENV,
    cache_of,
    random_ids,
    run_script,
    tiny_config,
    tiny_model,
)


UNKNOWN_FIELD = "RetNet does not know"  # in the warning about a config field that is neither RetNet's nor transformers'


def unknown_field_warnings(caught) -> list:
    return [str(w.message) for w in caught if UNKNOWN_FIELD in str(w.message)]


# ------------------------------------------------------------------------------------------- 1. config types


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("deepnorm", "false", "a bool"),
        ("deepnorm", "no", "a bool"),
        ("no_scale_embedding", 1, "a bool"),
        ("share_decoder_input_output_embed", "true", "a bool"),
        ("decoder_normalize_before", None, "a bool"),
        ("retention_normalization", 0, "a bool"),
        ("group_norm_affine", "False", "a bool"),
        ("layernorm_embedding", "yes", "a bool"),
        ("use_cache", "1", "a bool"),
        ("recurrent_chunk_size", True, "a positive int"),
        ("recurrent_chunk_size", 8.0, "a positive int"),
        ("decoder_layers", "2", "a positive int"),
        ("decoder_layers", True, "a positive int"),
        ("vocab_size", -64, "a positive int"),
        ("decoder_ffn_embed_dim", 64.5, "a positive int"),
        ("layernorm_eps", 0, "a float > 0"),
        ("layernorm_eps", -1e-6, "a float > 0"),
        ("layernorm_eps", "1e-6", "a float > 0"),
        ("layernorm_eps", float("nan"), "a float > 0"),
        ("dropout", 1.0, r"a float in \[0, 1\)"),
        ("dropout", "0.1", r"a float in \[0, 1\)"),
        ("activation_dropout", True, r"a float in \[0, 1\)"),
        ("rotary_style", None, "one of torchscale, neox"),
        ("pad_token_id", "0", "an int or None"),
        ("bos_token_id", True, "an int or None"),
        ("eos_token_id", [2, "3"], "an int or None"),
    ],
)
def test_a_field_of_the_wrong_type_is_a_value_error_naming_it(field, value, expected):
    message = rf"RetNetConfig\.{field} must be {expected}.*, got {re.escape(repr(value))} \({type(value).__name__}\)"
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_values_of_the_right_type_are_accepted():
    config = tiny_config(dropout=0, layernorm_eps=1, eos_token_id=[2, 3], pad_token_id=None, deepnorm=True)
    assert config.eos_token_id == [2, 3]
    assert config.decoder_normalize_before is False  # deepnorm implies post-norm, as in torchscale


def test_a_bad_value_in_config_json_is_refused_on_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "deepnorm": "false"}))
    with pytest.raises(ValueError, match=r"RetNetConfig\.deepnorm must be a bool.*got 'false'"):
        RetNetForCausalLM.from_pretrained(tmp_path)


def test_a_field_set_after_the_config_was_made_is_checked_by_the_model():
    config = tiny_config()
    config.layernorm_eps = 0
    with pytest.raises(ValueError, match=r"RetNetConfig\.layernorm_eps must be a float > 0"):
        RetNetForCausalLM(config)


# ------------------------------------------------------------------------------------- 2. unknown config fields


@pytest.mark.parametrize(
    "field, meant",
    [("rotary_stlye", "rotary_style"), ("decoder_layer", "decoder_layers"), ("num_hidden_layer", "num_hidden_layers")],
)
def test_a_misspelled_field_is_named_in_a_warning_with_the_field_meant(field, meant):
    with pytest.warns(UserWarning, match=rf"{UNKNOWN_FIELD}.*'{field}' \(did you mean '{meant}'\?\)"):
        tiny_config(**{field: 3})


def test_a_misspelled_field_in_config_json_is_named_on_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "decoder_layer": 4, "xyzzy": 1}))
    with pytest.warns(UserWarning, match=r"'decoder_layer' \(did you mean 'decoder_layers'\?\), 'xyzzy'\."):
        RetNetForCausalLM.from_pretrained(tmp_path)


def test_the_names_transformers_uses_do_not_warn(tmp_path):
    """Save and load (model and config), a config rebuilt from its full dict, transformers' common arguments and
    the names older releases write: no warning about an unknown field."""
    transformers_names = dict(
        return_dict=False,
        output_hidden_states=True,
        output_attentions=False,
        dtype="float16",
        torch_dtype="float16",
        tie_word_embeddings=True,
        problem_type="regression",
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        num_labels=2,
        architectures=["RetNetForCausalLM"],
        auto_map={"AutoConfig": "configuration_retnet.RetNetConfig"},
        transformers_version="4.48.0",
        _name_or_path="somewhere",
        name_or_path="somewhere",
        attn_implementation="eager",
        chunk_size_feed_forward=0,
        is_encoder_decoder=False,
        torchscript=False,  # 4.x names that 5.x dropped
        use_bfloat16=False,
        pruned_heads={},
        max_length=20,  # a generation parameter that old configs carry
        hidden_size=32,  # the standard alias of decoder_embed_dim
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tiny_model()
        model.save_pretrained(tmp_path)
        RetNetForCausalLM.from_pretrained(tmp_path)
        RetNetForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
        RetNetConfig.from_pretrained(tmp_path)
        RetNetConfig(**model.config.to_dict())
        RetNetConfig.from_dict(model.config.to_dict())
        tiny_config(**transformers_names)
    assert unknown_field_warnings(caught) == []


SAVE_AND_LOAD_UNDER_448 = (
    BLOCK_PACKAGE
    + """
import warnings
from transformers import AutoModelForCausalLM

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = AutoModelForCausalLM.from_pretrained("saved_here", trust_remote_code=True)
    model.save_pretrained("saved_448")
    AutoModelForCausalLM.from_pretrained("saved_448", trust_remote_code=True)
    type(model.config)(**model.config.to_dict())
messages = [str(w.message) for w in caught if "RetNet does not know" in str(w.message)]
assert messages == [], messages
print("ok")
"""
)


def test_folders_cross_between_transformers_448_and_the_running_version_without_warnings(tmp_path):
    python = os.environ.get(TRANSFORMERS_448_ENV)
    if not python:
        pytest.skip(f"set {TRANSFORMERS_448_ENV} to a python with transformers 4.48 (CI creates that venv)")
    tiny_model().save_pretrained(tmp_path / "saved_here")
    run_script(python, SAVE_AND_LOAD_UNDER_448, tmp_path, timeout=240)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = RetNetForCausalLM.from_pretrained(tmp_path / "saved_448")
        RetNetConfig(**loaded.config.to_dict())
    assert unknown_field_warnings(caught) == []
    assert Path(tmp_path / "saved_448" / "config.json").is_file()


# ----------------------------------------------------------------------------------- 3. attention mask values


ADDITIVE = "Additive masks .* are not accepted"


def padded_mask(batch=2, length=11, dtype=torch.long) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=dtype)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize(
    "mask, value",
    [
        (torch.where(padded_mask() == 1, 0.0, -1e4), "-10000.0"),  # additive: 0 keep, -1e4 at padding
        (torch.where(padded_mask() == 1, 0.0, float("-inf")), "-inf"),
        (padded_mask(dtype=torch.float) * 0.5, "0.5"),
        (padded_mask() * -1, "-1"),
        (padded_mask() * 2, "2"),
        (torch.full((2, 11), 0.5), "0.5"),  # nonzero everywhere: it used to count as no padding at all
    ],
)
@pytest.mark.parametrize("model_class", [RetNetForCausalLM, RetNetForSequenceClassification])
def test_a_mask_that_is_not_zero_one_is_a_value_error(model_class, mask, value):
    torch.manual_seed(0)
    model = model_class(tiny_config()).eval()
    message = rf"attention_mask must hold 1 for real tokens and 0 for padding.*got {re.escape(value)}\. {ADDITIVE}"
    with pytest.raises(ValueError, match=message):
        model(random_ids(), attention_mask=mask)


def test_a_bad_mask_column_in_a_cached_step_is_refused():
    model = tiny_model()
    ids = random_ids(length=6)
    cache = cache_of(model(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), use_cache=True))
    mask = torch.ones(2, 6)
    mask[1, -1] = -1e4
    with pytest.raises(ValueError, match=ADDITIVE):
        model(ids[:, 5:], attention_mask=mask, cache=cache)


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.int32, torch.float, torch.bfloat16])
def test_zero_one_masks_of_every_dtype_agree(dtype):
    model = tiny_model()
    ids = random_ids()
    reference = model(ids, attention_mask=padded_mask()).logits
    torch.testing.assert_close(model(ids, attention_mask=padded_mask(dtype=dtype)).logits, reference)
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 11, dtype=dtype)).logits, model(ids).logits)


def test_the_mask_check_leaves_the_model_one_graph_under_torch_compile():
    model = tiny_model().model
    ids, mask = random_ids(), padded_mask()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask, use_cache=False).last_hidden_state
        torch.testing.assert_close(out, model(ids, attention_mask=mask, use_cache=False).last_hidden_state)


# ------------------------------------------------------------------------------------- 4. another model's cache


@pytest.mark.parametrize(
    "other",
    [
        dict(decoder_layers=3),
        dict(decoder_layers=1),
        dict(decoder_retention_heads=4),
        dict(decoder_embed_dim=64),
        dict(decoder_value_embed_dim=64),
    ],
    ids=["more layers", "fewer layers", "more heads", "wider keys", "wider values"],
)
def test_a_cache_of_another_model_is_refused_before_any_layer_runs(other):
    model = tiny_model()
    ids = random_ids(length=6)
    foreign = cache_of(tiny_model(**other)(ids[:, :5], use_cache=True))
    states = list(foreign.states)
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"The cache was made for another model \(.*\); this model has 2 layers"):
        model(ids[:, 5:], cache=foreign)
    hook.remove()
    assert calls == [] and foreign.states == states and foreign.get_seq_length() == 5


def test_an_empty_cache_is_checked_by_its_layer_count():
    model = tiny_model()
    ids = random_ids(length=6)
    with pytest.raises(ValueError, match=r"made for another model \(3 layers\)"):
        model(ids, cache=RetNetCache(3))
    out = model(ids, cache=RetNetCache(2), use_cache=True)
    torch.testing.assert_close(out.logits, model(ids).logits)
    assert cache_of(out).get_seq_length() == 6
