"""A pytest plugin that runs flash-linear-attention's Triton kernels on a CPU, through Triton's interpreter.

Loaded only in a subprocess (`run_interpreted` in conftest.py: ``python -m pytest -p fla_interpreter ...``), because
``TRITON_INTERPRET=1`` must be set before triton is first imported and it changes every kernel launch of the
process. Two patches of triton's internals make fla 0.6.0's kernels run there:

1. fla autotunes every kernel, and triton's autotuner asks the GPU driver for a benchmarker ("0 active drivers"):
   the autotuner here keeps the first config and benchmarks nothing.
2. The interpreter runs ``for i in range(n)`` inside a kernel with Python ints, and fla calls ``i.to(tl.int64)`` on
   such indices (fla/ops/common/chunk_h.py): while an interpreted kernel runs, its module's ``range`` yields int32
   scalar tensors instead.

Both reach into private triton code, so they are pinned to the triton release that CI installs (`PINNED_TRITON`,
.ci/run's REFERENCES): another release stops the run with a message saying what to re-check, rather than letting a
changed internal give wrong numbers or a confusing error. The interpreter is wrong in float64 (fla's chunk and
parallel kernels) and bfloat16 matrix products: the tests use float32 and float16.
"""

import builtins
import os
import sys


PINNED_TRITON = "3.9.0"

if "triton" in sys.modules:
    raise RuntimeError("fla_interpreter must be loaded before triton is imported (TRITON_INTERPRET is read then).")
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.runtime.autotuner as autotuner  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402


if triton.__version__ != PINNED_TRITON:
    raise RuntimeError(
        f"tests/fla_interpreter.py patches triton {PINNED_TRITON}'s autotuner and interpreter, but triton "
        f"{triton.__version__} is installed. Install triton=={PINNED_TRITON} (as .ci/run does), or re-check both "
        "patches against the new release and move PINNED_TRITON and .ci/run's pin together."
    )

_autotuner_init = autotuner.Autotuner.__init__
_grid_call = interpreter.GridExecutor.__call__


def _first_config_only(self, fn, arg_names, configs, key, *args, **kwargs):
    _autotuner_init(self, fn, arg_names, configs[:1], key, *args, **kwargs)


def _run_first_config(self, *args, **kwargs):
    """`Autotuner.run` without timing: the first config, after its pre-hook (which zeroes outputs, for example)."""
    config = self.configs[0]
    if config.pre_hook:
        config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
    return self.fn.run(*args, **kwargs, **config.all_kwargs())


def _int32_range(*bounds):
    """`range` for interpreted kernels: int32 scalar tensors, on which kernels may call `.to()`."""
    bounds = [int(b.handle.data.item()) if hasattr(b, "handle") else int(b) for b in bounds]
    for i in builtins.range(*bounds):
        yield interpreter.tl.core.tensor(
            interpreter.TensorHandle(np.array(i, dtype=np.int32), interpreter.tl.int32), interpreter.tl.int32
        )


def _call_with_tensor_range(self, *args, **kwargs):
    module = sys.modules[self.fn.__module__]
    module.range = _int32_range
    try:
        return _grid_call(self, *args, **kwargs)
    finally:
        del module.range


autotuner.Autotuner.__init__ = _first_config_only
autotuner.Autotuner.run = _run_first_config
interpreter.GridExecutor.__call__ = _call_with_tensor_range


def pytest_report_header(config):
    return f"fla_interpreter: triton {triton.__version__} interpreted (TRITON_INTERPRET=1), autotuning off"
