"""Next to flash-linear-attention, which registers its own model_type "retnet" when imported."""

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retnet_hf import RetNetConfig, RetNetForCausalLM, RetNetModel

from conftest import (
    assert_same_state_dict,
    random_ids,
    run_script,
    tiny_model,
)


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
    ids = random_ids(vocab=50)
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
        ids = random_ids()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, ours(ids).logits)

        assert type(AutoConfig.from_pretrained(tmp_path / "fla", **kwargs)) is fla_models.RetNetConfig
        fla_loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fla", **kwargs)
        assert type(fla_loaded) is fla_models.RetNetForCausalLM
        assert_same_state_dict(fla_model.state_dict(), fla_loaded.state_dict())
        assert type(AutoModel.from_pretrained(tmp_path / "fla", **kwargs)) is fla_models.RetNetModel
