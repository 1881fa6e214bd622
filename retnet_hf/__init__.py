"""retnet-hf: the Retentive Network (RetNet) as a Hugging Face transformers model.

Importing the package registers the model with the Auto classes (model_type "retnet_hf") and marks its classes
for `save_pretrained` to write `auto_map` and the code, so a saved folder also loads with `trust_remote_code=True`
where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .model import (
    ACTIVATION_CHECKPOINTING,
    CACHE_NAME,
    LORA_TARGET_MODULES,
    RetNetCache,
    RetNetConfig,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetModel,
    RetNetPreTrainedModel,
    enable_activation_checkpointing,
)


__version__ = "0.2.0"  # the one place the version is written (pyproject.toml reads it)

AutoConfig.register(RetNetConfig.model_type, RetNetConfig, exist_ok=True)
RetNetConfig.register_for_auto_class()
for auto_class, model_class in (
    (AutoModel, RetNetModel),
    (AutoModelForCausalLM, RetNetForCausalLM),
    (AutoModelForSequenceClassification, RetNetForSequenceClassification),
):
    auto_class.register(RetNetConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "CACHE_NAME",
    "LORA_TARGET_MODULES",
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "enable_activation_checkpointing",
]
