"""save_pretrained / from_pretrained round trips through the Auto classes (safetensors, dtypes, tied weights,
the base model and the classifier from a causal-LM folder) and resized embeddings. Tiny local models only."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from retnet_hf import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel

from conftest import (
    assert_same_state_dict,
    assert_saved_folder,
    random_ids,
    tiny_config,
    tiny_model,
)


# --------------------------------------------------------------------------------------------------------------
# 1. save_pretrained / from_pretrained round trips
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_causal_lm_round_trip_safetensors(tmp_path, tied):
    model = tiny_model(share_decoder_input_output_embed=tied)
    if not tied:  # make sure an untied head really differs from the embedding
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    assert_saved_folder(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "retnet_hf"
    assert config["auto_map"]["AutoConfig"] == "configuration_retnet.RetNetConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retnet.RetNetForCausalLM"
    assert config["share_decoder_input_output_embed"] is tied

    loaded_config = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded_config) is RetNetConfig
    assert loaded_config.share_decoder_input_output_embed is tied
    assert loaded_config.tie_word_embeddings is tied
    for name in (
        "vocab_size",
        "decoder_embed_dim",
        "decoder_value_embed_dim",
        "decoder_layers",
        "recurrent_chunk_size",
        "pad_token_id",
        "eos_token_id",
    ):
        assert getattr(loaded_config, name) == getattr(model.config, name), name

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is RetNetForCausalLM
    assert not loaded.training
    assert_same_state_dict(model.state_dict(), loaded.state_dict())
    shares = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shares is tied
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), expected)

    # the base model alone, through AutoModel, from the same folder (prefix "model." stripped)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is RetNetModel
    assert_same_state_dict(model.model.state_dict(), base.state_dict())
    with torch.no_grad():
        assert torch.equal(model.model(ids).last_hidden_state, base(ids).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bfloat16", "float64"])
def test_round_trip_keeps_the_dtype(tmp_path, dtype):
    """The weights come back in the dtype they were saved in; the rotation angles and decays stay at least float32
    (`_keep_in_fp32_modules_strict`), so the logits are those of the saved model."""
    model = tiny_model(dtype)
    assert model.model.retnet_rel_pos.angle.dtype == torch.promote_types(dtype, torch.float32)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == dtype
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert loaded.model.retnet_rel_pos.angle.dtype in (torch.float32, torch.float64)
    for name in ("angle", "decay"):
        torch.testing.assert_close(
            getattr(loaded.model.retnet_rel_pos, name).double(),
            getattr(model.model.retnet_rel_pos, name).double(),
            atol=0,
            rtol=0,
        )
    ids = random_ids()
    with torch.no_grad():
        # transformers >= 5.24 may leave loaded weights unaligned in memory (views of the safetensors file), where
        # BLAS takes another kernel: equal weights, float64 products that differ in the last bit
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-13)
        expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), expected)


def test_tied_weights_stay_tied_after_loading(tmp_path):
    """Training a loaded tied model moves the embedding and the head together (one parameter)."""
    tiny_model(share_decoder_input_output_embed=True).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    names = [name for name, _ in loaded.named_parameters()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    with torch.no_grad():
        loaded.model.embed_tokens.weight[5] += 1.0
    assert torch.equal(loaded.lm_head.weight[5], loaded.model.embed_tokens.weight[5])


def test_base_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RetNetModel(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    assert_saved_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_retnet.RetNetModel"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is RetNetModel
    assert_same_state_dict(model.state_dict(), loaded.state_dict())
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)


def test_sequence_classification_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RetNetForSequenceClassification(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    assert_saved_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_retnet.RetNetForSequenceClassification"
    )
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is RetNetForSequenceClassification
    assert loaded.config.num_labels == 3
    assert_same_state_dict(model.state_dict(), loaded.state_dict())
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        assert expected.shape == (2, 3)
        assert torch.equal(loaded(ids, attention_mask=mask).logits, expected)


def test_causal_lm_folder_loads_as_sequence_classifier(tmp_path):
    """A language model's folder starts a classifier: the body is loaded, only `score` is new."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert type(classifier) is RetNetForSequenceClassification
    assert_same_state_dict(model.model.state_dict(), classifier.model.state_dict())
    assert torch.isfinite(classifier.score.weight).all() and classifier.score.weight.abs().sum() > 0
    with torch.no_grad():
        assert classifier(random_ids()).logits.shape == (2, 2)


# --------------------------------------------------------------------------------------------------------------
# 7. resize_token_embeddings
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("new_size", [80, 40])
def test_resize_token_embeddings(tmp_path, tied, new_size):
    model = tiny_model(share_decoder_input_output_embed=tied)
    ids = random_ids(vocab=40)  # ids that survive the smaller vocabulary
    with torch.no_grad():
        before = model(ids).logits
    embeddings = model.resize_token_embeddings(new_size)
    assert embeddings is model.get_input_embeddings()
    assert model.config.vocab_size == new_size
    assert model.model.embed_tokens.weight.shape == (new_size, 32)
    assert model.lm_head.weight.shape == (new_size, 32)
    assert model.model.embed_tokens.num_embeddings == new_size
    shares = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert shares is tied
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    kept = min(new_size, 64)
    with torch.no_grad():
        after = model(ids).logits
        assert after.shape == (2, ids.shape[1], new_size)
        assert torch.isfinite(after).all()
        # the rows of the old tokens are kept, so their logits are unchanged
        torch.testing.assert_close(after[..., :kept], before[..., :kept], atol=1e-6, rtol=0)
        generated = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, ids.shape[1] + 4) and int(generated.max()) < new_size
    if new_size > 64:
        new_ids = torch.tensor([[5, 70, 79, 3]])
        with torch.no_grad():
            assert torch.isfinite(model(new_ids).logits).all()

    # training still updates one shared matrix when tied
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    if tied:
        assert model.lm_head.weight.grad is model.model.embed_tokens.weight.grad
    model.eval()

    # and the resized model round-trips
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == new_size
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) is tied
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, after)
