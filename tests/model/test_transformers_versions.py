"""What differs between transformers releases, checked on the running one and, through the code a saved folder
carries, under transformers 4.48 (AutoTrain's pin) in a process without the package.

transformers 5.24 renamed the cache from `past_key_values` to `cache` (forward argument, generate()'s model kwargs,
output fields) and gradient checkpointing to activation checkpointing; `modeling_retnet.py` bridges both in one
place (`CACHE_NAME`, `ACTIVATION_CHECKPOINTING`). Here: both cache names are taken, the outputs carry the cache in
the running version's field, no deprecation is logged in ordinary use, `**kwargs` swallows nothing, the
GenerationMixin hooks that stay overridden are needed, and every generate() mode gives the same tokens and per-step
logits with and without the cache, in this process and as remote code under each transformers of the matrix.
"""

import copy
import json
import os
import sys
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig, GenerationMixin, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.testing_utils import CaptureLogger

from retnet_hf import (
    ACTIVATION_CHECKPOINTING,
    CACHE_NAME,
    RetNetCache,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetModel,
    enable_activation_checkpointing,
)
from retnet_hf.model.modeling_retnet import (
    NATIVE_RECURRENT_CACHE,
    GradientCheckpointingLayer,
    RetNetGenerationMixin,
    RetNetPreTrainedModel,
)

from conftest import (
    BLOCK_PACKAGE,
    TRANSFORMERS_448_ENV,
    TRANSFORMERS_524_ENV,
    cache_of,
    random_ids,
    run_script,
    tiny_config,
    tiny_model,
)


CHUNKED_PREFILL = "prefill_chunk_size" in GenerationConfig().to_dict()  # transformers >= 5


def prompt(batch=2, length=7, seed=0):
    return random_ids(batch, length, seed)


def model64():
    model = tiny_model(torch.float64, recurrent_chunk_size=4)
    model.generation_config.eos_token_id = None
    return model


class FirstCacheSeen:
    """Records the cache that each call of the backbone receives."""

    def __init__(self, model):
        self.caches = []
        self.handle = model.model.register_forward_pre_hook(
            lambda module, args, kwargs: self.caches.append(kwargs.get("cache")), with_kwargs=True
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------------------------ 1. the cache's two names


def test_cache_name_is_the_running_versions_output_field():
    fields = CausalLMOutputWithPast.__dataclass_fields__
    assert CACHE_NAME in fields
    assert CACHE_NAME == ("cache" if "cache" in fields else "past_key_values")
    ids = prompt()
    for model_class in (RetNetModel, RetNetForCausalLM, RetNetForSequenceClassification):
        torch.manual_seed(0)
        out = model_class(tiny_config()).eval()(ids, use_cache=True)
        assert isinstance(out.__dict__.get(CACHE_NAME), RetNetCache), model_class.__name__
        assert out.to_tuple()[1] is cache_of(out)  # (hidden states or logits, cache)


@pytest.mark.parametrize("model_class", [RetNetModel, RetNetForCausalLM, RetNetForSequenceClassification])
def test_forward_takes_the_state_as_cache_or_past_key_values(model_class):
    torch.manual_seed(0)
    model = model_class(tiny_config()).to(torch.float64).eval()
    ids = prompt(length=9)
    first = model(ids[:, :5], use_cache=True)

    def continued(**kwargs):
        out = model(ids[:, 5:], **kwargs)
        return out.last_hidden_state if model_class is RetNetModel else out.logits

    by_new_name = continued(cache=copy.deepcopy(cache_of(first)))
    by_old_name = continued(past_key_values=copy.deepcopy(cache_of(first)))
    same = copy.deepcopy(cache_of(first))
    both_same_object = continued(cache=same, past_key_values=same)
    torch.testing.assert_close(by_new_name, by_old_name, rtol=0, atol=0)
    torch.testing.assert_close(by_new_name, both_same_object, rtol=0, atol=0)
    assert not torch.allclose(by_new_name, continued())  # the state did matter
    with pytest.raises(ValueError, match="two names of the same argument"):
        continued(cache=copy.deepcopy(cache_of(first)), past_key_values=copy.deepcopy(cache_of(first)))


# ------------------------------------------------------------------------------ 2. **kwargs swallows nothing


@pytest.mark.parametrize("model_class", [RetNetModel, RetNetForCausalLM, RetNetForSequenceClassification])
def test_an_unknown_keyword_is_a_type_error_naming_it(model_class):
    model = model_class(tiny_config()).eval()
    with pytest.raises(TypeError, match="unexpected keyword argument.*'cahce'"):
        model(prompt(), cahce=None)


def test_output_attentions_is_refused_with_a_reason():
    model = tiny_model()
    assert model(prompt(), output_attentions=False).logits is not None
    with pytest.raises(ValueError, match="no attention weights"):
        model(prompt(), output_attentions=True)


def test_num_items_in_batch_reaches_the_loss():
    """Trainer passes `num_items_in_batch` under gradient accumulation: the loss is then a sum over it."""
    model = tiny_model(torch.float64)
    ids = prompt(length=10)
    labels = ids.clone()
    labels[:, :3] = -100
    mean = model(ids, labels=labels).loss
    counted = (labels[:, 1:] != -100).sum()
    assert counted == 2 * 7
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(4)).loss
    torch.testing.assert_close(summed, mean * counted / 4)


def test_a_packed_row_from_cu_seq_lens_equals_position_ids():
    """TRL's padding-free collator sends `cu_seq_lens_q` (and its equivalents) beside `position_ids`; without
    position_ids the offsets alone separate the documents."""
    model = tiny_model(torch.float64, recurrent_chunk_size=4)
    lengths = [5, 7, 3]
    ids = prompt(batch=1, length=sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    offsets = torch.tensor([0, 5, 12, 15], dtype=torch.int32)
    packing = dict(
        cu_seq_lens_q=offsets,
        cu_seq_lens_k=offsets,
        max_length_q=7,
        max_length_k=7,
        seq_idx=torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None],
    )
    reference = model(ids, position_ids=position_ids).logits
    assert not torch.allclose(reference, model(ids).logits)  # the boundaries matter
    torch.testing.assert_close(model(ids, **packing).logits, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(ids, position_ids=position_ids, **packing).logits, reference, rtol=0, atol=0)
    torch.testing.assert_close(
        model.model(ids, **packing).last_hidden_state,
        model.model(ids, position_ids=position_ids).last_hidden_state,
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="one flattened row"):
        model(prompt(batch=2, length=15), cu_seq_lens_q=offsets)


# -------------------------------------------------------------- 3. the GenerationMixin hooks that stay overridden


def test_generate_hands_the_model_its_cache_up_front(monkeypatch):
    """`_prepare_cache_for_generation` gives the first forward a RetNetCache: chunked prefill needs one."""
    model, ids = model64(), prompt(length=10)
    with FirstCacheSeen(model) as seen:
        reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert isinstance(seen.caches[0], RetNetCache)
    assert all(cache is seen.caches[0] for cache in seen.caches)
    if CHUNKED_PREFILL:
        assert torch.equal(model.generate(ids, prefill_chunk_size=3, max_new_tokens=4, do_sample=False), reference)

    monkeypatch.delattr(RetNetGenerationMixin, "_prepare_cache_for_generation")  # the base class's hook again
    with FirstCacheSeen(model) as seen:
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert seen.caches[0] is None
    if CHUNKED_PREFILL:
        with pytest.raises(ValueError, match="without a cache"):
            model.generate(ids, prefill_chunk_size=3, max_new_tokens=4, do_sample=False)


def test_generate_makes_no_key_value_cache(monkeypatch):
    """`_supports_default_dynamic_cache` returns False: else generate() builds transformers' KV cache."""
    model, ids = model64(), prompt()
    assert model._supports_default_dynamic_cache() is False
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 10)
    monkeypatch.setattr(
        RetNetPreTrainedModel,
        "_supports_default_dynamic_cache",
        classmethod(lambda cls: GenerationMixin._supports_default_dynamic_cache.__func__(cls)),
    )
    with pytest.raises(TypeError, match="must be a RetNetCache"):
        model.generate(ids, max_new_tokens=3, do_sample=False)


def test_the_cache_answers_what_generate_asks():
    from transformers import cache_utils

    LinearAttentionCacheLayerMixin = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    model = tiny_model()
    cache = cache_of(model(prompt(length=5), use_cache=True))
    if NATIVE_RECURRENT_CACHE:  # transformers' own recurrent layers: no 4D masks, compileable, croppable
        assert all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)
        assert cache.is_linear == [True, True]
        assert cache.is_compileable is True and cache.is_croppable is True
    else:  # before 5.25: counted like a KV cache (generate() feeds only the unseen tokens), no rollback
        assert cache.is_linear == [False, False]
        assert cache.is_compileable is False and cache.is_croppable is False
    assert cache.get_seq_length() == 5
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.get_seq_length() == 5


# ---------------------------------------------------------------------------- 4. no deprecation in ordinary use


def test_no_deprecation_is_announced_in_ordinary_use(tmp_path):
    """Forward, the state round trip, generate() in its modes, a Trainer step with activation checkpointing: no
    FutureWarning and no logged deprecation (transformers logs each only once, so its memory is cleared first)."""
    transformers.utils.logging.warning_once.cache_clear()
    logger = transformers.utils.logging.get_logger("transformers")
    model, ids = model64(), prompt(length=10)
    with warnings.catch_warnings(record=True) as caught, CaptureLogger(logger) as logs:
        warnings.simplefilter("always")
        out = model(ids, use_cache=True)
        model(ids[:, :2], **{CACHE_NAME: cache_of(out)})
        model.generate(ids, max_new_tokens=3, do_sample=False)
        model.generate(ids, max_new_tokens=3, num_beams=2, do_sample=False)
        first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        model.generate(first.sequences, **{CACHE_NAME: cache_of(first)}, max_new_tokens=2, do_sample=False)
        if CHUNKED_PREFILL:
            model.generate(ids, prefill_chunk_size=4, max_new_tokens=2, do_sample=False)

        train_model = tiny_model()
        enable_activation_checkpointing(train_model)
        rows = [{"input_ids": row, "labels": row} for row in prompt(batch=4, length=12)]
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            **{ACTIVATION_CHECKPOINTING: True},
        )
        Trainer(model=train_model, args=args, train_dataset=rows).train()
    messages = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    messages = [m for m in messages if "torch.jit" not in m]  # torch's own, from imports
    assert messages == []
    assert "deprecated" not in logs.out, logs.out
    assert train_model.model.layers[0].gradient_checkpointing


def test_decoder_layers_are_gradient_checkpointing_layers():
    model = tiny_model()
    assert all(isinstance(layer, GradientCheckpointingLayer) for layer in model.model.layers)
    library = pytest.importorskip("transformers.modeling_layers", reason="transformers < 4.52 has no such class")
    assert GradientCheckpointingLayer is library.GradientCheckpointingLayer  # the bridge is only for 4.48


# ------------------------------------------- 5. cached == uncached generation, as remote code, across versions

# Runs in a child python without the package, on the folder's own code: the running transformers, and 4.48.
GENERATION_SCRIPT = (
    BLOCK_PACKAGE
    + """
import json
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CHUNKED = "prefill_chunk_size" in GenerationConfig().to_dict()
model = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).double().eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
ids = torch.load("inputs.pt")
padded, mask = torch.load("padded.pt")
report = {"version": transformers.__version__, "modes": {}}

def compare(name, run, **kwargs):
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outputs.append(run(use_cache=use_cache, return_dict_in_generate=True, output_logits=True, **kwargs))
    cached, recomputed = outputs
    report["modes"][name] = {
        "same_tokens": bool(torch.equal(cached.sequences, recomputed.sequences)),
        "steps": len(cached.logits),
        "max_logit_diff": max(float((a - b).abs().max()) for a, b in zip(cached.logits, recomputed.logits)),
    }

def generate(**kwargs):
    return lambda **more: model.generate(**kwargs, **more)

new = dict(max_new_tokens=6, min_new_tokens=6)
compare("greedy", generate(inputs=ids, do_sample=False, **new))
compare("sampling", generate(inputs=ids, do_sample=True, top_k=20, temperature=0.8, **new))
compare("sampling_num_return_sequences", generate(inputs=ids, do_sample=True, num_return_sequences=2, **new))
compare("beam", generate(inputs=ids, num_beams=3, do_sample=False, **new))
compare("beam_num_return_sequences", generate(inputs=ids, num_beams=3, num_return_sequences=2, do_sample=False, **new))
compare("repetition_penalty", generate(inputs=ids, repetition_penalty=1.5, do_sample=False, **new))
compare("left_padded", generate(inputs=padded, attention_mask=mask, do_sample=False, **new))
compare("inputs_embeds", generate(inputs_embeds=model.get_input_embeddings()(ids), do_sample=False, **new))
if CHUNKED:
    compare("chunked_prefill", lambda use_cache, **kw: model.generate(
        ids, prefill_chunk_size=3 if use_cache else None, use_cache=use_cache, do_sample=False, **new, **kw))

# continuing from a cache built by a forward pass, and from one that generate() returned
prefix = getattr(model(ids[:, :-3], use_cache=True), CACHE)
compare("continued_from_forward", lambda use_cache, **kw: model.generate(
    ids, **({CACHE: prefix} if use_cache else {}), use_cache=use_cache, do_sample=False, **new, **kw))
first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
returned, history = getattr(first, CACHE), first.sequences
compare("continued_from_generate", lambda use_cache, **kw: model.generate(
    history, **({CACHE: returned} if use_cache else {}), use_cache=use_cache, do_sample=False, **new, **kw))

# assisted generation and prompt lookup: plain greedy's tokens where the release rolls a recurrent state back,
# a refusal that says so before it
draft = AutoModelForCausalLM.from_pretrained("draft", trust_remote_code=True).double().eval()
draft.generation_config.eos_token_id = None
repetitive = torch.arange(5, 10).repeat(3)[None]

def assisted(inputs, **kwargs):
    try:
        out = model.generate(inputs, max_new_tokens=10, do_sample=False, **kwargs)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    plain = model.generate(inputs, max_new_tokens=10, do_sample=False)
    return {"same_tokens": bool(torch.equal(out, plain))}

report["assisted"] = assisted(ids[:1], assistant_model=draft)
report["prompt_lookup"] = assisted(repetitive, prompt_lookup_num_tokens=3)

# float32: per-step logits of greedy decoding within 1e-5
model32 = AutoModelForCausalLM.from_pretrained("model", trust_remote_code=True).float().eval()
model32.generation_config.eos_token_id = None
runs = [model32.generate(ids, use_cache=c, do_sample=False, return_dict_in_generate=True, output_logits=True, **new)
        for c in (True, False)]
report["fp32_max_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(runs[0].logits, runs[1].logits))

# the hooks that stay overridden: without each, something breaks
cls = type(model)
first_caches = []
handle = model.model.register_forward_pre_hook(
    lambda m, a, kw: first_caches.append(type(kw.get("cache")).__name__), with_kwargs=True)
model.generate(ids, max_new_tokens=2, do_sample=False)
report["first_cache_with_hook"] = first_caches[0]
hook_owner = next(c for c in cls.__mro__ if "_prepare_cache_for_generation" in c.__dict__)
hook = hook_owner.__dict__["_prepare_cache_for_generation"]
delattr(hook_owner, "_prepare_cache_for_generation")
first_caches.clear()
model.generate(ids, max_new_tokens=2, do_sample=False)
report["first_cache_without_hook"] = first_caches[0]
setattr(hook_owner, "_prepare_cache_for_generation", hook)
handle.remove()
owner = next(c for c in cls.__mro__ if "_supports_default_dynamic_cache" in c.__dict__ and c is not GenerationMixin)
saved = owner.__dict__["_supports_default_dynamic_cache"]
delattr(owner, "_supports_default_dynamic_cache")
try:
    model.generate(ids, max_new_tokens=2, do_sample=False)
    report["without_no_dynamic_cache"] = "ran"
except Exception as error:
    report["without_no_dynamic_cache"] = f"{type(error).__name__}: {error}"
setattr(owner, "_supports_default_dynamic_cache", saved)
json.dump(report, open("report.json", "w"))
print("ok", transformers.__version__)
"""
)

MODES = [
    "greedy",
    "sampling",
    "sampling_num_return_sequences",
    "beam",
    "beam_num_return_sequences",
    "repetition_penalty",
    "left_padded",
    "inputs_embeds",
    "chunked_prefill",
    "continued_from_forward",
    "continued_from_generate",
]
PYTHONS = {
    "running": lambda: sys.executable,
    "4.48": lambda: os.environ.get(TRANSFORMERS_448_ENV),
    "5.24": lambda: os.environ.get(TRANSFORMERS_524_ENV),
}
PYTHON_ENVS = {"4.48": TRANSFORMERS_448_ENV, "5.24": TRANSFORMERS_524_ENV}


@pytest.fixture(scope="module", params=list(PYTHONS))
def remote_code_report(request, tmp_path_factory):
    python = PYTHONS[request.param]()
    if not python:
        pytest.skip(
            f"set {PYTHON_ENVS[request.param]} to a python with transformers {request.param} (CI creates that venv)"
        )
    folder = tmp_path_factory.mktemp(f"generation_{request.param}")
    tiny_model(recurrent_chunk_size=4, seed=5).save_pretrained(folder / "model")
    tiny_model(seed=6, decoder_layers=1, decoder_embed_dim=16, decoder_value_embed_dim=32).save_pretrained(
        folder / "draft"
    )
    torch.save(prompt(length=9, seed=1), folder / "inputs.pt")
    from test_generation import left_pad, ragged_prompts

    torch.save(left_pad(ragged_prompts()), folder / "padded.pt")
    run_script(python, GENERATION_SCRIPT, folder, timeout=300)
    report = json.loads((folder / "report.json").read_text())
    if request.param != "running":
        assert report["version"].startswith(request.param), report["version"]
    else:
        assert report["version"] == transformers.__version__
    return report


@pytest.mark.parametrize("mode", MODES)
def test_remote_code_generates_the_same_with_and_without_the_cache(remote_code_report, mode):
    modes = remote_code_report["modes"]
    if mode == "chunked_prefill" and mode not in modes:
        pytest.skip(f"transformers {remote_code_report['version']} has no prefill_chunk_size")
    result = modes[mode]
    assert result["steps"] == 6
    assert result["same_tokens"], result
    assert result["max_logit_diff"] <= 1e-10, result


def test_remote_code_fp32_logits_agree_with_and_without_the_cache(remote_code_report):
    assert remote_code_report["fp32_max_logit_diff"] <= 1e-5


def test_remote_code_needs_its_generation_hooks(remote_code_report):
    assert remote_code_report["first_cache_with_hook"] == "RetNetCache"
    assert remote_code_report["first_cache_without_hook"] == "NoneType"
    assert remote_code_report["without_no_dynamic_cache"].startswith("TypeError"), remote_code_report


@pytest.mark.parametrize("way", ["assisted", "prompt_lookup"])
def test_remote_code_rolls_back_exactly_or_says_which_release_can(remote_code_report, way):
    """transformers 5.25+: plain greedy's tokens; 5.x before it: a refusal naming 5.25; 4.48: its own refusal of
    assisted generation for stateful models. Never an AttributeError."""
    result, version = remote_code_report[way], Version(remote_code_report["version"])
    if version >= Version("5.25"):
        assert result == {"same_tokens": True}
    elif version >= Version("5"):
        assert result["error"].startswith("ValueError") and "needs transformers >= 5.25" in result["error"], result
    else:
        assert result["error"].startswith("ValueError") and "stateful" in result["error"], result


# ------------------------------------------------- 6. the suite fails on a deprecation that reaches this code


def test_a_transformers_deprecation_called_from_the_project_fails_the_suite():
    """transformers attributes a deprecation to its caller; pyproject's filters turn it into an error when the caller
    is a test or the package, not only when it is transformers itself."""
    from transformers.utils.deprecation import deprecate_kwarg

    @deprecate_kwarg("old_name", version="99.0.0", new_name="new_name")
    def renamed(new_name=None):
        return new_name

    assert renamed(new_name=1) == 1
    with pytest.raises(FutureWarning, match="`old_name` is deprecated"):
        renamed(old_name=1)  # called from this test module
    package_caller = {"__name__": "retnet_hf.model.modeling_retnet"}
    exec("def call(function):\n    return function(old_name=1)\n", package_caller)
    with pytest.raises(FutureWarning, match="`old_name` is deprecated"):
        package_caller["call"](renamed)  # called from a module of the package
