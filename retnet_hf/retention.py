"""Deprecated: moved to `retnet_hf.model.retention` in 0.2.0. This old import path warns (FutureWarning)
and is removed in 0.3.0 (tests/tools/test_layout.py fails from that version on while it is here)."""

import sys
import warnings

from .model import retention as _moved


warnings.warn(
    "retnet_hf.retention is deprecated and will be removed in retnet-hf 0.3.0: import "
    "retnet_hf.model.retention instead.",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
