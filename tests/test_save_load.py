"""Saving and loading: safetensors round trips through the Auto classes, `trust_remote_code` in a process without
the package (transformers 5.x, and 4.48 when CI provides it), coexistence with another "retnet" model type,
accelerate's device maps and disk offload, FSDP's wrap policy, resized embeddings and gradient checkpointing.

Everything uses tiny models built locally and tmp_path folders; nothing is downloaded.
"""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from retnet_hf import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel
from retnet_hf.modeling_retnet import RetNetDecoderLayer

from conftest import (
    BLOCK_PACKAGE,
    TRANSFORMERS_448_ENV,
    cache_of,
    run_script,
    tiny_config,
    tiny_model,
)


CODE_FILES = ("modeling_retnet.py", "configuration_retnet.py", "retention.py")


def sample_ids(batch=2, length=11, seed=0, vocab=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def assert_same_state_dict(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_saved_folder(folder: Path):
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files), files
    for name in CODE_FILES:
        assert name in files, f"{name} was not copied next to the weights: {sorted(files)}"


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

    ids = sample_ids()
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
    ids = sample_ids()
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
    ids = sample_ids()
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
    ids = sample_ids()
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
        assert classifier(sample_ids()).logits.shape == (2, 2)


# --------------------------------------------------------------------------------------------------------------
# 2. trust_remote_code in a process that cannot import retnet_hf
# --------------------------------------------------------------------------------------------------------------

REMOTE_CODE_SCRIPT = (
    BLOCK_PACKAGE
    + """
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

ids = torch.load("inputs.pt")
results = {"version": transformers.__version__}
for folder in ("tied", "untied"):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "RetNetForCausalLM", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    with torch.no_grad():
        results[folder] = {
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            "logits": model(ids).logits,
            "generated": model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5),
        }

# the language model's folder through the other Auto classes (a classifier fine-tuned from a published checkpoint)
for name, auto_class in (("AutoModel", AutoModel), ("AutoModelForSequenceClassification",
                                                     AutoModelForSequenceClassification)):
    try:
        other = auto_class.from_pretrained("untied", trust_remote_code=True)
        with torch.no_grad():
            output = other(ids)
        results[name] = (type(other).__name__, type(other).__module__,
                         getattr(output, "last_hidden_state", None), getattr(output, "logits", None))
    except Exception as error:  # the message lists every known config class: keep its start
        results[name] = f"{type(error).__name__}: {str(error)[:400]}"
assert "retnet_hf" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
torch.save(results, "results.pt")
print("ok", transformers.__version__)
"""
)


@pytest.fixture(scope="module")
def remote_code_run(tmp_path_factory):
    """Save a tied and an untied model, load both in a child process that cannot import retnet_hf."""
    tmp_path = tmp_path_factory.mktemp("remote_code")
    models = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        models[name] = tiny_model(share_decoder_input_output_embed=tied, seed=int(tied))
        models[name].save_pretrained(tmp_path / name)
        assert_saved_folder(tmp_path / name)
    ids = sample_ids()
    torch.save(ids, tmp_path / "inputs.pt")
    run_script(sys.executable, REMOTE_CODE_SCRIPT, tmp_path)
    return models, ids, torch.load(tmp_path / "results.pt")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trust_remote_code_without_the_package(remote_code_run, tied):
    models, ids, results = remote_code_run
    model = models["tied" if tied else "untied"]
    results = results["tied" if tied else "untied"]
    assert results["tied"] is tied
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.testing.assert_close(results["logits"], logits, atol=1e-6, rtol=0)
    assert torch.equal(results["generated"], generated)
    assert generated.shape == (2, ids.shape[1] + 5)


@pytest.mark.parametrize("auto_class", ["AutoModel", "AutoModelForSequenceClassification"])
def test_trust_remote_code_other_auto_classes_from_a_causal_lm_folder(remote_code_run, auto_class):
    """A published language model is also loaded as a body or as a classifier to fine-tune: its config.json
    must name every Auto class in `auto_map`, not only the class that was saved (this process resolves them from
    the local registration, so only a process without the package shows the difference)."""
    models, ids, results = remote_code_run
    result = results[auto_class]
    assert not isinstance(result, str), f"{auto_class}.from_pretrained(trust_remote_code=True) failed:\n{result}"
    class_name, module, hidden, logits = result
    assert module.startswith("transformers_modules"), module
    if auto_class == "AutoModel":
        assert class_name == "RetNetModel"
        with torch.no_grad():
            expected = models["untied"].model(ids).last_hidden_state
        torch.testing.assert_close(hidden, expected, atol=1e-6, rtol=0)
    else:
        assert class_name == "RetNetForSequenceClassification"
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------------------
# 3. The same folder under transformers 4.48 (a separate interpreter, named by RETNET_TRANSFORMERS_448_PYTHON)
# --------------------------------------------------------------------------------------------------------------

TRANSFORMERS_448_SCRIPT = (
    BLOCK_PACKAGE
    + """
import torch
import transformers
from transformers import AutoModelForCausalLM

assert transformers.__version__.startswith("4.48"), transformers.__version__
ids = torch.load("inputs.pt")
all_results = {"version": transformers.__version__, "torch": str(torch.__version__)}
for folder in ("tied", "untied"):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == "RetNetForCausalLM", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    results = all_results[folder] = {}
    results["tied"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    results["loaded_in_eval_mode"] = not model.training

    model.eval()
    with torch.no_grad():
        results["logits"] = model(ids).logits

    model.train()
    output = model(ids, labels=ids)
    output.loss.backward()
    results["loss"] = output.loss.detach()
    results["grads"] = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        results["greedy"] = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        torch.manual_seed(1234)
        results["sampled"] = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=0)
        results["beams"] = model.generate(ids, max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False)

    # Each step below records its error instead of raising, so that one broken step fails only its own test.
    # gradient checkpointing as 4.48's Trainer enables it (4.48's default: use_reentrant=True)
    try:
        model.train()
        model.gradient_checkpointing_enable()
        results["checkpointing_active"] = bool(model.model.gradient_checkpointing)
        model(ids, labels=ids).loss.backward()
        results["checkpointed_grads"] = {name: None if p.grad is None else p.grad.clone()
                                         for name, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval()
    except Exception as error:
        results["checkpointed_grads"] = f"{type(error).__name__}: {error}"
    # saved again under 4.48 (a model fine-tuned with a 4.x Trainer): the folder must still carry the code
    try:
        saved = Path(folder + "_saved_448").resolve()
        model.save_pretrained(saved)
        results["saved_448"] = str(saved)
    except Exception as error:
        results["saved_448"] = f"{type(error).__name__}: {error}"
    # resize_token_embeddings under 4.48 (its tying reads `_tied_weights_keys`, a dict in our code)
    try:
        model.resize_token_embeddings(80)
        with torch.no_grad():
            resized_logits = model(ids).logits
        results["resized"] = {
            "vocab_size": model.config.vocab_size,
            "shapes": (tuple(model.model.embed_tokens.weight.shape), tuple(model.lm_head.weight.shape)),
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            "logits": resized_logits,
        }
    except Exception as error:
        results["resized"] = f"{type(error).__name__}: {error}"
torch.save(all_results, "results.pt")
print("ok", transformers.__version__)
"""
)


@pytest.fixture(scope="module")
def transformers_448_run(tmp_path_factory):
    python = os.environ.get(TRANSFORMERS_448_ENV)
    if not python:
        pytest.skip(f"set {TRANSFORMERS_448_ENV} to a python with transformers 4.48 (CI creates that venv)")
    assert Path(python).exists(), f"{TRANSFORMERS_448_ENV}={python} does not exist"
    tmp_path = tmp_path_factory.mktemp("transformers_448")
    models = {}
    for tied in (True, False):
        name = "tied" if tied else "untied"
        models[name] = tiny_model(share_decoder_input_output_embed=tied, seed=2 + int(tied))
        models[name].save_pretrained(tmp_path / name)
    ids = sample_ids(length=13, seed=3)
    torch.save(ids, tmp_path / "inputs.pt")
    run_script(python, TRANSFORMERS_448_SCRIPT, tmp_path, timeout=240)
    return models, ids, torch.load(tmp_path / "results.pt")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trust_remote_code_under_transformers_448(transformers_448_run, tied):
    models, ids, all_results = transformers_448_run
    assert all_results["version"].startswith("4.48")
    model = models["tied" if tied else "untied"]
    results = all_results["tied" if tied else "untied"]
    assert results["tied"] is tied
    assert results["loaded_in_eval_mode"]

    with torch.no_grad():
        torch.testing.assert_close(results["logits"], model(ids).logits, atol=1e-6, rtol=0)

    # forward + backward: finite, non-zero gradients for every parameter, equal to this process's
    assert torch.isfinite(results["loss"])
    model.train()
    output = model(ids, labels=ids)
    output.loss.backward()
    model.eval()
    torch.testing.assert_close(results["loss"], output.loss.detach(), atol=1e-5, rtol=0)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert results["grads"].keys() == grads.keys()
    for name, grad in results["grads"].items():
        assert grad is not None, f"no gradient for {name} under transformers 4.48"
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, f"zero gradient for {name} under transformers 4.48"
        torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert greedy.shape == (2, ids.shape[1] + 5)
    assert torch.equal(results["greedy"], greedy)
    for key in ("sampled", "beams"):
        assert results[key].shape == greedy.shape, key
        assert torch.equal(results[key][:, : ids.shape[1]], ids), key
        assert ((results[key] >= 0) & (results[key] < 64)).all(), key


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradient_checkpointing_under_transformers_448(transformers_448_run, tied):
    _, _, all_results = transformers_448_run
    results = all_results["tied" if tied else "untied"]
    checkpointed = results["checkpointed_grads"]
    assert not isinstance(checkpointed, str), f"gradient checkpointing failed under transformers 4.48: {checkpointed}"
    assert results["checkpointing_active"]
    assert checkpointed.keys() == results["grads"].keys()
    for name, grad in results["grads"].items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(
            checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_folder_saved_under_transformers_448_keeps_its_code(transformers_448_run, tied):
    """A model loaded with trust_remote_code under 4.48 (AutoTrain pins 4.x) and saved again must still be a
    complete folder: config.json's auto_map names modeling_retnet.py, so that file and retention.py must be
    copied too. (4.48's Auto classes do not call `register_for_auto_class` on a remote model class, so 4.48
    copies only the code of classes whose `_auto_class` is set by the class itself.)"""
    models, ids, all_results = transformers_448_run
    saved = all_results["tied" if tied else "untied"]["saved_448"]
    assert Path(saved).is_dir(), f"save_pretrained failed under transformers 4.48: {saved}"
    saved = Path(saved)
    files = {p.name for p in saved.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files), files
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    needed = {reference.split(".")[0] + ".py" for reference in auto_map.values()}
    assert "modeling_retnet.py" in needed, auto_map
    missing = sorted((needed | set(CODE_FILES)) - files)
    assert not missing, f"a folder saved under transformers 4.48 lacks {missing} (it has {sorted(files)})"
    # and the folder loads here again, with the same weights
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert_same_state_dict(models["tied" if tied else "untied"].state_dict(), loaded.state_dict())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resize_token_embeddings_under_transformers_448(transformers_448_run, tied):
    models, ids, all_results = transformers_448_run
    resized = all_results["tied" if tied else "untied"]["resized"]
    assert not isinstance(resized, str), f"resize_token_embeddings failed under transformers 4.48: {resized}"
    assert resized["vocab_size"] == 80
    assert resized["shapes"] == ((80, 32), (80, 32))
    assert resized["tied"] is tied
    with torch.no_grad():
        before = models["tied" if tied else "untied"](ids).logits
    torch.testing.assert_close(resized["logits"][..., :64], before, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# 5. accelerate: device_map="auto", disk offload, infer_auto_device_map
# --------------------------------------------------------------------------------------------------------------

needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="device maps and offloading need accelerate"
)


def split_layers(device_map: dict) -> list:
    """Entries of a device map that place a part of a decoder layer (`model.layers.N.<something>`)."""
    return [name for name in device_map if re.match(r"^model\.layers\.\d+\.", name)]


def layer_devices(device_map: dict, num_layers: int) -> list:
    """The device of each decoder layer, resolved through the map's prefixes."""
    devices = []
    for index in range(num_layers):
        name = f"model.layers.{index}"
        owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
        assert owners, f"{name} is not placed by {device_map}"
        devices.append(device_map[max(owners, key=len)])
    return devices


@pytest.fixture
def four_layer_folder(tmp_path):
    model = tiny_model(decoder_layers=4)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@needs_accelerate
def test_device_map_auto_on_cpu(four_layer_folder):
    model, folder = four_layer_folder
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="auto")
    assert type(loaded) is RetNetForCausalLM
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=4, do_sample=False), expected)


@needs_accelerate
@pytest.mark.parametrize(
    "device_map",
    [
        {
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.layers.2": "cpu",
            "model.layers.3": "disk",
            "model.layer_norm": "cpu",
            "model.retnet_rel_pos": "cpu",
            "lm_head": "disk",
        },
        {
            "model.embed_tokens": "disk",
            "model.layers": "disk",
            "model.layer_norm": "disk",
            "model.retnet_rel_pos": "disk",
            "lm_head": "cpu",
        },
        "auto_small_memory",
    ],
    ids=["layers_alternate", "all_but_head_on_disk", "auto_max_memory"],
)
def test_disk_offload_same_logits_and_generate(four_layer_folder, tmp_path, device_map):
    model, folder = four_layer_folder
    kwargs = {"device_map": device_map, "offload_folder": tmp_path / "offload"}
    if device_map == "auto_small_memory":  # layers 0, 1 fit in memory (~51 KB each), the rest goes to disk
        kwargs = {"device_map": "auto", "max_memory": {"cpu": 200_000}, "offload_folder": tmp_path / "offload"}
    loaded = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert "disk" in loaded.hf_device_map.values(), loaded.hf_device_map
    assert not split_layers(loaded.hf_device_map), loaded.hf_device_map
    assert any(p.device.type == "meta" for p in loaded.parameters())  # offloaded weights are really off the model
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False), expected)
        torch.manual_seed(0)
        sampled = loaded.generate(ids, max_new_tokens=3, do_sample=True)
    assert sampled.shape == (2, ids.shape[1] + 3)


@needs_accelerate
@pytest.mark.parametrize(
    "device_map",
    [
        {
            "model.embed_tokens": "cpu",
            "model.layers": "cpu",
            "model.layer_norm": "cpu",
            "model.retnet_rel_pos": "disk",
            "lm_head": "cpu",
        },
        {"": "disk"},
    ],
    ids=["rel_pos_on_disk", "everything_on_disk"],
)
def test_disk_offload_with_offloaded_buffers(four_layer_folder, tmp_path, device_map):
    """`offload_buffers=True` moves buffers off the model too: the decays must still reach the layers."""
    model, folder = four_layer_folder
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path / "offload", offload_buffers=True
    )
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        expected = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert torch.equal(loaded.generate(ids, max_new_tokens=3, do_sample=False), expected)


@needs_accelerate
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "max_memory",
    [
        {"cpu": 200_000, "disk": 10**9},
        {"cpu": 130_000, "disk": 10**9},
        {0: 90_000, 1: 90_000, "cpu": 10**9},  # fake accelerators: only the sizes are read
        {0: 130_000, "cpu": 90_000, "disk": 10**9},
    ],
)
def test_infer_auto_device_map_never_splits_a_layer(max_memory):
    from accelerate import infer_auto_device_map

    model = tiny_model(decoder_layers=4)
    assert set(model._no_split_modules) == {"RetNetDecoderLayer"}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
    assert not split_layers(device_map), device_map
    devices = layer_devices(device_map, 4)
    assert len(set(devices)) >= 2, f"the memory limits should spread the layers over devices: {device_map}"
    # the same limits without the no-split list do cut a layer: the check above is not vacuous
    assert split_layers(infer_auto_device_map(model, max_memory=max_memory))


# --------------------------------------------------------------------------------------------------------------
# 4. Coexistence with flash-linear-attention, which registers its own model_type "retnet" when imported
# --------------------------------------------------------------------------------------------------------------

# A stand-in for `import fla`: classes with fla's names (RetNetConfig, RetNetModel, RetNetForCausalLM) and model_type
# "retnet", registered as fla registers them (exist_ok=True). It runs in a child process, so the registration does
# not outlive the test. MODE is "package": the stand-in is registered before `import retnet_hf` and again after it
# (both import orders), or "remote_code": retnet_hf cannot be imported and our folder is loaded from its own code.
FLA_STAND_IN_SCRIPT = """
import sys

MODE = "{mode}"
if MODE == "remote_code":
    sys.modules["retnet_hf"] = None
    try:
        import retnet_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("retnet_hf is importable in the child process")

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

try:
    from transformers import PreTrainedConfig
except ImportError:
    from transformers import PretrainedConfig as PreTrainedConfig


def import_fla():
    global RetNetConfig, RetNetModel, RetNetForCausalLM

    class RetNetConfig(PreTrainedConfig):
        model_type = "retnet"

        def __init__(self, vocab_size=50, hidden_size=12, num_heads=3, **kwargs):
            self.vocab_size, self.hidden_size, self.num_heads = vocab_size, hidden_size, num_heads
            super().__init__(**kwargs)

    class RetNetPreTrainedModel(PreTrainedModel):
        config_class = RetNetConfig
        base_model_prefix = "model"

        def _init_weights(self, module):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.5)

    class RetNetModel(RetNetPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.post_init()

        def forward(self, input_ids=None, **kwargs):
            return BaseModelOutput(last_hidden_state=torch.tanh(self.embeddings(input_ids)))

    class RetNetForCausalLM(RetNetPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = RetNetModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, **kwargs):
            return CausalLMOutput(logits=self.lm_head(self.model(input_ids).last_hidden_state))

    AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
    AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
    AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)


ids = torch.load("inputs.pt")
reference = torch.load("reference.pt")


def check(step, fla_model, fla_logits):
    for attempt in ("plain", "trust_remote_code"):
        kwargs = {{"trust_remote_code": True}} if MODE == "remote_code" or attempt != "plain" else {{}}
        where = (MODE, step, attempt)
        config = AutoConfig.from_pretrained("ours", **kwargs)
        assert config.model_type == "retnet_hf" and type(config) is not RetNetConfig, (where, type(config))
        ours = AutoModelForCausalLM.from_pretrained("ours", **kwargs).eval()
        assert type(ours).__name__ == "RetNetForCausalLM" and type(ours) is not RetNetForCausalLM, (where, type(ours))
        expected_module = "transformers_modules" if MODE == "remote_code" else "retnet_hf."
        assert type(ours).__module__.startswith(expected_module), (where, type(ours).__module__)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, reference["logits"], atol=1e-6, rtol=0)
            generated = ours.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(generated, reference["generated"]), where
        if MODE != "remote_code":  # AutoModel with remote code: test_trust_remote_code_other_auto_classes...
            base = AutoModel.from_pretrained("ours", **kwargs)
            assert type(base).__name__ == "RetNetModel" and type(base) is not RetNetModel, (where, type(base))

        assert type(AutoConfig.from_pretrained("fla_model", **kwargs)) is RetNetConfig, where
        fla_loaded = AutoModelForCausalLM.from_pretrained("fla_model", **kwargs)
        assert type(fla_loaded) is RetNetForCausalLM, (where, type(fla_loaded))
        with torch.no_grad():
            assert torch.equal(fla_loaded(ids).logits, fla_logits), where
        assert type(AutoModel.from_pretrained("fla_model", **kwargs)) is RetNetModel, where
    print("checked", step)


import_fla()  # fla imported first
torch.manual_seed(0)
fla_model = RetNetForCausalLM(RetNetConfig()).eval()
fla_model.save_pretrained("fla_model")
with torch.no_grad():
    fla_logits = fla_model(ids).logits
if MODE == "package":
    import retnet_hf  # noqa: F401
    check("fla_before_retnet_hf", fla_model, fla_logits)
    import_fla()  # registered again, after retnet_hf (as a later `import fla` would)
    check("fla_after_retnet_hf", fla_model, fla_logits)
else:
    check("fla_with_remote_code", fla_model, fla_logits)
print("ok", MODE)
"""


@pytest.mark.parametrize("mode", ["package", "remote_code"])
def test_coexists_with_another_retnet_model_type(tmp_path, mode):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "retnet_hf"
    ids = sample_ids(vocab=50)
    with torch.no_grad():
        reference = {
            "logits": model(ids).logits,
            "generated": model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False),
        }
    torch.save(ids, tmp_path / "inputs.pt")
    torch.save(reference, tmp_path / "reference.pt")
    result = run_script(sys.executable, FLA_STAND_IN_SCRIPT.format(mode=mode), tmp_path)
    assert f"ok {mode}" in result.stdout
    expected_steps = ["fla_before_retnet_hf", "fla_after_retnet_hf"] if mode == "package" else ["fla_with_remote_code"]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("checked")] == expected_steps
    fla_config = json.loads((tmp_path / "fla_model" / "config.json").read_text())
    assert fla_config["model_type"] == "retnet"
    # the stand-in's registration stayed in the child
    assert type(AutoConfig.for_model("retnet_hf")) is RetNetConfig
    with pytest.raises(ValueError):
        AutoConfig.for_model("retnet")


def test_coexists_with_flash_linear_attention(tmp_path):
    """The real flash-linear-attention where it is installed. It imports on a CPU machine once triton is installed
    (fla 0.6.0 + triton 3.9: it warns and falls back to CPU), but its kernels need a GPU, so only construction,
    saving and loading of its model are run; ours also runs forward. fla's registration of "retnet" is undone
    afterwards (the stand-in test above checks that "retnet" is unknown in this process)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    registries = [
        CONFIG_MAPPING._extra_content,
        AutoModel._model_mapping._extra_content,
        AutoModelForCausalLM._model_mapping._extra_content,
    ]
    saved_registries = [dict(registry) for registry in registries]
    try:
        import fla.models as fla_models
    except ImportError as error:
        pytest.skip(
            f"flash-linear-attention is not importable here ({error}); pip install --no-deps "
            "flash-linear-attention==0.6.0 fla-core==0.6.0 triton==3.9.0 einops (the README's set-up)"
        )
    try:
        check_coexistence_with_fla(fla_models, tmp_path)
    finally:  # fla's "retnet" registration must not leak into other tests (an `import fla` only registers once)
        for registry, saved in zip(registries, saved_registries):
            registry.clear()
            registry.update(saved)


def check_coexistence_with_fla(fla_models, tmp_path):
    assert type(AutoConfig.for_model("retnet")) is fla_models.RetNetConfig
    assert type(AutoConfig.for_model("retnet_hf")) is RetNetConfig

    ours = tiny_model(share_decoder_input_output_embed=True)
    ours.save_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    fla_model = fla_models.RetNetForCausalLM(
        fla_models.RetNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)
    )
    fla_model.save_pretrained(tmp_path / "fla")
    assert json.loads((tmp_path / "fla" / "config.json").read_text())["model_type"] == "retnet"

    for kwargs in ({}, {"trust_remote_code": True}):
        assert type(AutoConfig.from_pretrained(tmp_path / "ours", **kwargs)) is RetNetConfig
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", **kwargs)
        assert type(loaded) is RetNetForCausalLM
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert type(AutoModel.from_pretrained(tmp_path / "ours", **kwargs)) is RetNetModel
        ids = sample_ids()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ours(ids).logits)

        assert type(AutoConfig.from_pretrained(tmp_path / "fla", **kwargs)) is fla_models.RetNetConfig
        fla_loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fla", **kwargs)
        assert type(fla_loaded) is fla_models.RetNetForCausalLM
        assert_same_state_dict(fla_model.state_dict(), fla_loaded.state_dict())
        assert type(AutoModel.from_pretrained(tmp_path / "fla", **kwargs)) is fla_models.RetNetModel


# --------------------------------------------------------------------------------------------------------------
# 6. FSDP: the decoder layer is the wrapping unit
# --------------------------------------------------------------------------------------------------------------


def test_fsdp_auto_wrap_policy_wraps_each_decoder_layer():
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.trainer_pt_utils import get_module_class_from_name

    model = tiny_model(decoder_layers=3)
    # what Trainer does with fsdp_config["transformer_layer_cls_to_wrap"] (default: model._no_split_modules)
    names = list(model._no_split_modules)
    assert names == ["RetNetDecoderLayer"]
    layer_class = get_module_class_from_name(model, names[0])
    assert layer_class is RetNetDecoderLayer
    assert get_module_class_from_name(model, "NoSuchLayer") is None

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_class})
    wrapped = [
        name
        for name, module in model.named_modules()
        if policy(module=module, recurse=False, nonwrapped_numel=sum(p.numel() for p in module.parameters()))
    ]
    assert wrapped == [f"model.layers.{i}" for i in range(3)]
    # recursing into every module is allowed (so the layers are reached)
    assert all(policy(module=module, recurse=True, nonwrapped_numel=0) for module in model.modules())
    # every parameter outside the layers is left to the root unit: embeddings, final norm, head
    outside = {name for name, _ in model.named_parameters() if not name.startswith("model.layers.")}
    assert outside == {"model.embed_tokens.weight", "model.layer_norm.weight", "lm_head.weight"}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
def test_fsdp_wraps_each_decoder_layer_and_gives_the_same_gradients(tmp_path):
    """A real FSDP (FullyShardedDataParallel) wrap with that policy, in this process (gloo, world size 1, CPU):
    one unit per decoder layer plus the root, and the same loss and gradients as the unwrapped model (fp64)."""
    import functools

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.trainer_pt_utils import get_module_class_from_name

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a process group already running")
    model = tiny_model(torch.float64, decoder_layers=3, share_decoder_input_output_embed=True).train()
    reference = tiny_model(torch.float64, decoder_layers=3, share_decoder_input_output_embed=True).train()
    layer_class = get_module_class_from_name(model, sorted(model._no_split_modules)[0])
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_class})
    ids = sample_ids(length=13)
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True
        )
        units = [module for module in wrapped.modules() if isinstance(module, FullyShardedDataParallel)]
        assert units[0] is wrapped
        assert [type(unit.module) for unit in units[1:]] == [RetNetDecoderLayer] * 3
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {name.replace("_fsdp_wrapped_module.", ""): p.grad for name, p in wrapped.named_parameters()}
    finally:
        dist.destroy_process_group()
    expected_loss = reference(input_ids=ids, labels=ids).loss
    expected_loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), atol=1e-12, rtol=0)
    expected = dict(reference.named_parameters())
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name].grad, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------------------
# 7. resize_token_embeddings, gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("new_size", [80, 40])
def test_resize_token_embeddings(tmp_path, tied, new_size):
    model = tiny_model(share_decoder_input_output_embed=tied)
    ids = sample_ids(vocab=40)  # ids that survive the smaller vocabulary
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
    ids = sample_ids(length=20)  # longer than a chunk (8): the chunkwise form
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
