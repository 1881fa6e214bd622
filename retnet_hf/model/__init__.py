"""The RetNet model: the files that travel with every saved checkpoint.

`save_pretrained` copies `modeling_retnet.py`, `configuration_retnet.py`, `retention.py` and `fla_retention.py` next
to the weights, and `from_pretrained(..., trust_remote_code=True)` runs them where retnet-hf is not installed, under
any transformers from 4.48 on. So these files import only torch, transformers, the standard library and each other
(relatively), and nothing above them in the package, but for flash-linear-attention, imported by `fla_retention.py`
when first used and optional (`tests/model/test_travelling_code.py` checks it). This `__init__` does not travel.
"""

from .configuration_retnet import RETENTION_BACKENDS, RETENTION_FORMS, RetNetConfig
from .modeling_retnet import (
    ACTIVATION_CHECKPOINTING,
    CACHE_NAME,
    LORA_TARGET_MODULES,
    RetNetCache,
    RetNetForCausalLM,
    RetNetForSequenceClassification,
    RetNetGenerationMixin,
    RetNetModel,
    RetNetPreTrainedModel,
    enable_activation_checkpointing,
)


__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "CACHE_NAME",
    "LORA_TARGET_MODULES",
    "RETENTION_BACKENDS",
    "RETENTION_FORMS",
    "RetNetCache",
    "RetNetConfig",
    "RetNetForCausalLM",
    "RetNetForSequenceClassification",
    "RetNetGenerationMixin",
    "RetNetModel",
    "RetNetPreTrainedModel",
    "enable_activation_checkpointing",
]
