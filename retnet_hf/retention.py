"""Moved to `retnet_hf.model.retention`; the old import path keeps working for this release (0.2) only."""

import sys
import warnings

from .model import retention as _moved


warnings.warn(
    "retnet_hf.retention moved to retnet_hf.model.retention; import it from there (the old path goes after 0.2).",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
