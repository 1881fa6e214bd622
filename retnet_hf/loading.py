"""Loading a model folder (or Hub id: `model_folder.resolve_source` tells which) for the commands: no code of the
folder's own runs without consent, and a model with missing weights is refused rather than run with random layers.

A RetNet folder (`model_type` "retnet_hf") loads through the installed package, never through the Python files
saved next to its weights; any other folder whose config asks for its own code (`auto_map`) loads only with
`trust_remote_code=True` (the commands' `--trust-remote-code`). transformers itself would ask interactively or run
it; the commands decide here instead, before anything is imported.
"""

import json
from pathlib import Path

from .errors import UsageError
from .model import RetNetConfig
from .model_folder import is_model_folder, resolve_source


def refuse_foreign_code(source: str, trust_remote_code: bool) -> None:
    """A UsageError when the local folder `source` would need its own Python code to load and the user did not
    pass `--trust-remote-code`. RetNet folders never need it: the installed package's classes load them."""
    if trust_remote_code or not is_model_folder(source):
        return
    config_path = Path(source).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{source}: cannot read config.json: {error}") from error
    if not isinstance(config, dict) or config.get("model_type") == RetNetConfig.model_type:
        return
    if config.get("auto_map"):
        raise UsageError(
            f"{source} is not a RetNet folder (model_type {config.get('model_type')!r}) and asks to run its own "
            "Python code (auto_map in config.json); read that code, then pass --trust-remote-code to run it"
        )


def load_causal_lm(source: str, *, trust_remote_code: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(source, **kwargs)` for a command: foreign code only with consent, the
    loader's errors as a UsageError, and every weight present (missing or mis-shaped tensors are an error: the
    model would run with randomly initialised layers)."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(source)
    refuse_foreign_code(source, trust_remote_code)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
    except Exception as error:  # whatever the loaders raise (bad JSON, truncated safetensors, offline Hub id, ...)
        raise UsageError(f"{source}: cannot load the model: {_first_line(error)}") from error
    missing = list(info.get("missing_keys", ())) + [str(item[0]) for item in info.get("mismatched_keys", ())]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(
            f"{source}: the weights lack or mis-shape {len(missing)} tensor(s) of the model ({shown}); the model "
            "would run with random layers. Check config.json against the weight files (or reconvert the checkpoint)"
        )
    return model


def load_tokenizer(source: str, *, trust_remote_code: bool = False, what: str = "model"):
    """`AutoTokenizer.from_pretrained(source)` for a command, its errors as a UsageError."""
    from transformers import AutoTokenizer

    source = resolve_source(source, what)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise UsageError(f"{source}: cannot load its tokenizer: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if "\n" in text and len(text) > 300 else text


__all__ = ["load_causal_lm", "load_tokenizer", "refuse_foreign_code"]
