"""A saved folder runs on its own code: `trust_remote_code` in a process that cannot import retnet_hf, under the
running transformers and under 4.48 (AutoTrain's pin; CI makes that venv, named by RETNET_TRANSFORMERS_448_PYTHON)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    BLOCK_PACKAGE,
    CODE_FILES,
    TRANSFORMERS_448_ENV,
    assert_same_state_dict,
    assert_saved_folder,
    random_ids,
    run_script,
    tiny_model,
)


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
    ids = random_ids()
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
    ids = random_ids(length=13, seed=3)
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
