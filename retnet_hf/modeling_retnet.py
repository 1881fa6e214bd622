"""Moved to `retnet_hf.model.modeling_retnet`; the old import path keeps working for this release (0.2) only."""

import sys
import warnings

from .model import modeling_retnet as _moved


warnings.warn(
    "retnet_hf.modeling_retnet moved to retnet_hf.model.modeling_retnet; import it from there (the old path goes after 0.2).",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
