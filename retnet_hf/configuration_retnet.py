"""Moved to `retnet_hf.model.configuration_retnet`; the old import path keeps working for this release (0.2) only."""

import sys
import warnings

from .model import configuration_retnet as _moved


warnings.warn(
    "retnet_hf.configuration_retnet moved to retnet_hf.model.configuration_retnet; import it from there (the old path goes after 0.2).",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
