"""Supervised fine-tuning of a RetNet on chat data: PEFT LoRA / QLoRA and TRL's SFTTrainer.

- `LORA_TARGET_MODULES`: the eight projections of every layer (retention q, k, v, g, out; feed-forward fc1, gate,
  fc2), for `LoraConfig(target_modules=...)` (PEFT has no RetNet entry of its own; `"all-linear"` picks the same
  modules and leaves `lm_head` alone).
- Data in the openassistant-guanaco form, `### Human: question### Assistant: answer`, from a Hub id or a local
  jsonl/parquet/csv; Llama-2 style rows (`<s>[INST] q [/INST] a </s>`) are rewritten to that form.
- `GUANACO_CHAT_TEMPLATE`: a chat template for that form (`tokenizer.apply_chat_template`).
- `prepare_for_kbit`: PEFT's `prepare_model_for_kbit_training` plus the bitsandbytes CPU fix (on a
  CPU with AVX512-BF16 a no-grad forward repacks a `Linear4bit` weight for inference, after which LoRA gradients
  are wrong): `support_avx512bf16_for_cpu = False` on every `Linear4bit`, and any weight already repacked is
  unpacked.
- `sft(...)`: the whole run with TRL's `SFTTrainer` (progress bar, loss curve PNG, checkpoints that resume, the
  adapter or the merged model at the end).
"""

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .data import DEFAULT_DATASET, fit_to_max_length, load_guanaco, save_tokenizer, set_chat_template
from .errors import UsageError, require
from .loading import load_causal_lm, load_tokenizer, refuse_foreign_code
from .model import ACTIVATION_CHECKPOINTING, LORA_TARGET_MODULES, enable_activation_checkpointing
from .model_folder import is_local, require_model_folder, resolve_source
from .options import positive_float, positive_int
from .runs import (
    RunSettings,
    base_training_arguments,
    check_run_inputs,
    claimed_output,
    disk_full_explained,
    divergence_guard,
    last_checkpoint,
    logged_losses,
    plot_loss_curve,
    record_finished,
    source_fingerprint,
    write_training_summary,
)


def linear4bit_modules(model) -> list:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def disable_cpu_inference_repacking(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference (which breaks their gradients),
    and undo a repacking that already happened (after a generate or an evaluation). Returns the module count."""
    modules = linear4bit_modules(model)
    if not modules:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for module in modules:
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return len(modules)


def prepare_for_kbit(model, gradient_checkpointing: bool = True):
    """`peft.prepare_model_for_kbit_training` and the bitsandbytes CPU fix; call before `get_peft_model`."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:  # here, under the running transformers' name (PEFT calls the deprecated one)
        enable_activation_checkpointing(model)
    disable_cpu_inference_repacking(model)
    return model


def lora_config(
    rank: int = 16,
    alpha: Optional[int] = None,
    dropout: float = 0.05,
    target_modules: Sequence[str] = tuple(LORA_TARGET_MODULES),
):
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(folder: str, method: str = "lora", dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False):
    """The model of `folder` for `method` "lora" / "full" (float) or "qlora" (nf4, double quant) / "lora8" (int8).

    A RetNet folder loads through this package; another folder's own code runs only with `trust_remote_code`.
    Missing weights are a UsageError (`loading.load_causal_lm`)."""
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if method == "qlora":
        compute = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    elif method == "lora8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif dtype is not None:
        kwargs["dtype"] = dtype
    return load_causal_lm(folder, trust_remote_code=trust_remote_code, **kwargs)


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    train_loss: Optional[float]
    losses: List[float]
    seconds: float
    merged: bool
    trainable_parameters: int
    resumed_from: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    trained: bool = True  # False: a rerun of a finished run, which trained nothing


METHODS = {
    "lora": "LoRA on a float base model (the default)",
    "qlora": "LoRA on a 4-bit (nf4) base model",
    "full": "train every weight",
}


@dataclass
class SFTSettings(RunSettings):
    """One fine-tuning run; `retnet-hf sft`'s options are made from these fields."""

    model: str = field(default="", metadata=dict(positional=True, help="a model folder (with its tokenizer)"))
    output_dir: str = field(
        default="",
        metadata=dict(flag="--output", required=True, help="folder for checkpoints and the adapter or merged model"),
    )
    data: str = field(
        default=DEFAULT_DATASET,
        metadata=dict(
            help="a Hub data set id or a local .jsonl/.json/.parquet/.csv with '### Human: ... ### Assistant: ...' "
            f"or '<s>[INST] ... [/INST] ... </s>' rows (default {DEFAULT_DATASET})"
        ),
    )
    text_column: str = field(default="text", metadata=dict(help="the data's text column (default text)"))
    method: str = field(default="lora", metadata=dict(choices=METHODS, choice_flags=True))
    rank: int = field(default=16, metadata=dict(parse=positive_int, help="LoRA rank (default 16)"))
    alpha: Optional[int] = field(default=None, metadata=dict(parse=positive_int, help="LoRA alpha (default 2 x rank)"))
    lora_dropout: float = field(default=0.05, metadata=dict(help="dropout on the LoRA path (default 0.05)"))
    target_modules: Tuple[str, ...] = field(default=tuple(LORA_TARGET_MODULES), metadata=dict(cli=False))
    learning_rate: float = field(
        default=2e-4, metadata=dict(flag="--lr", parse=positive_float, help="peak learning rate (cosine)")
    )
    max_length: int = field(default=512, metadata=dict(parse=positive_int, help="tokens per sequence (default 512)"))
    packing: bool = field(
        default=False, metadata=dict(help="pack documents into padding-free rows (the state resets at each document)")
    )
    completion_only: bool = field(default=False, metadata=dict(help="loss on the last answer of each row only"))
    gradient_checkpointing: bool = False
    epochs: float = field(default=1.0, metadata=dict(group="steps", help="passes over the data (default 1)"))
    max_steps: int = field(
        default=-1, metadata=dict(group="steps", parse=positive_int, help="optimiser steps (overrides epochs)")
    )
    batch_size: int = field(default=4, metadata=dict(parse=positive_int))
    gradient_accumulation_steps: int = field(default=1, metadata=dict(parse=positive_int))
    save_steps: int = field(default=200, metadata=dict(parse=positive_int))
    logging_steps: int = field(default=10, metadata=dict(parse=positive_int))
    limit: Optional[int] = field(default=None, metadata=dict(parse=positive_int, help="use only the first N rows"))
    merge: bool = field(default=False, metadata=dict(help="save the model with the adapter merged in"))
    disable_tqdm: bool = field(default=False, metadata=dict(cli=False))
    write_card: bool = field(default=True, metadata=dict(cli=False))


def sft(settings: SFTSettings) -> SFTResult:
    """Fine-tune the model folder `settings.model` on guanaco-form chat data with TRL's `SFTTrainer`.

    `method`: "lora" (float base, LoRA on `target_modules`), "qlora" (4-bit nf4 base, LoRA), "full" (every weight).
    Checkpoints go to `output_dir/checkpoints` and a run resumes from the newest one; `output_dir` gets the adapter
    (loads with `PeftModel.from_pretrained` or, where peft is installed, `AutoModelForCausalLM`), or with
    `merge=True` (or `method="full"`) a whole model that loads with `AutoModelForCausalLM`; the tokenizer with the
    guanaco chat template, `loss.png` and `training_summary.json`.
    """
    s = settings
    _check(s)
    with claimed_output(s.output_dir, "sft", overwrite=s.overwrite), disk_full_explained(s.output_dir):
        finished = check_run_inputs(s.output_dir, "sft", run_inputs(s), s.resume)
        if finished and finished["plan"] == _plan(s):
            return _finished_earlier(s, finished)
        return _sft(s)


def run_inputs(s: SFTSettings) -> dict:
    """What an sft run is started with, which a resumed run must share: the base model, the data (files by
    SHA-256), the method and its LoRA settings, and how rows become training sequences."""
    lora = None
    if s.method != "full":
        lora = {"rank": s.rank, "alpha": s.alpha, "dropout": s.lora_dropout, "target_modules": s.target_modules}
    return {
        "model": source_fingerprint(s.model),
        "data": source_fingerprint(s.data),
        "text_column": s.text_column,
        "method": s.method,
        "lora": lora,
        "rows": {
            "max_length": s.max_length,
            "packing": s.packing,
            "completion_only": s.completion_only,
            "limit": s.limit,
            "seed": s.seed,
        },
    }


def _plan(s: SFTSettings) -> dict:
    """How long the run trains: what a finished run's rerun must ask for again to be a rerun."""
    return {"max_steps": s.max_steps, "epochs": s.epochs, "merge": s.merge}


def _finished_earlier(s: SFTSettings, finished: dict) -> SFTResult:
    """A rerun of a finished run: no training; missing outputs are written again (the tokenizer, the loss curve,
    the summary, the card; a LoRA adapter from the last checkpoint), and it says so."""
    output = Path(s.output_dir)
    result = SFTResult(output_dir=output, **{**finished["result"], "trained": False})
    last = output / "checkpoints" / f"checkpoint-{result.steps}"
    rewritten = []
    weights = ("adapter_model.safetensors",) if not result.merged else ("config.json",)
    if not all((output / name).is_file() for name in weights):
        if result.merged or not (last / "adapter_model.safetensors").is_file():
            raise UsageError(
                f"--output {s.output_dir}: the run finished, but its {'model' if result.merged else 'adapter'} files "
                "are gone; run with --no-resume to train it again"
            )
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(last / name, output / name)
        rewritten.append("the adapter")
    if not (output / "tokenizer.json").is_file():
        save_tokenizer(set_chat_template(load_tokenizer(s.model, trust_remote_code=s.trust_remote_code)), output)
        rewritten.append("the tokenizer")
    if not (output / "loss.png").is_file() and (last / "trainer_state.json").is_file():
        plot_loss_curve(json.loads((last / "trainer_state.json").read_text())["log_history"], output / "loss.png")
        rewritten.append("loss.png")
    if not (output / "training_summary.json").is_file():
        write_training_summary(output, finished["summary"])
        rewritten.append("training_summary.json")
    if s.write_card and not (output / "README.md").is_file():
        _write_card(output, s.model, s.data, finished["summary"])
        rewritten.append("the model card")
    print(
        f"{s.output_dir}: this run finished earlier ({result.steps} steps); nothing to train"
        f"{'; wrote again what was missing: ' + ', '.join(rewritten) if rewritten else ''} (--no-resume trains "
        "afresh; more --epochs or --max-steps go on)"
    )
    return result


def _sft(s: SFTSettings) -> SFTResult:
    tokenizer, dataset = tokenizer_and_data(s)
    torch.manual_seed(s.seed)
    model = trainable_model(s, tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    guard = divergence_guard()
    trainer = sft_trainer(s, model, tokenizer, dataset, callbacks=[guard])
    checkpoints = Path(s.output_dir) / "checkpoints"
    last = last_checkpoint(checkpoints, s.resume)
    start = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - start
    guard.raise_if_diverged(s)
    merged = _save(s, trainer.model, tokenizer)
    plot_loss_curve(trainer.state.log_history, Path(s.output_dir) / "loss.png")
    finished = trainer.state.global_step >= trainer.state.max_steps
    losses = logged_losses(trainer.state.log_history)
    result = SFTResult(
        output_dir=Path(s.output_dir),
        steps=trainer.state.global_step,
        train_loss=losses[-1] if losses else train_output.training_loss,
        losses=losses,
        seconds=seconds,
        merged=merged,
        trainable_parameters=trainable,
        resumed_from=last,
        metrics=dict(train_output.metrics),
    )
    summary = _summarise(s, result)
    if finished:
        fields = {name: value for name, value in asdict(result).items() if name not in ("output_dir", "trained")}
        record_finished(s.output_dir, {"plan": _plan(s), "result": fields, "summary": summary})
    return result


def sft_command(settings: SFTSettings) -> None:
    """`retnet-hf sft`: `sft`, and a line on what it trained and saved."""
    result = sft(settings)
    if not result.trained:
        return  # a finished run's rerun: it said so
    what = "merged model" if result.merged else "LoRA adapter"
    loss = f"{result.train_loss:.3f}" if result.train_loss is not None else "n/a"
    print(
        f"fine-tuned ({settings.method}) {result.steps} steps in {result.seconds:.0f} s, last training loss {loss}; "
        f"{what} saved to {result.output_dir} (loss curve: loss.png)"
    )


def _check(s: SFTSettings) -> None:
    if s.method not in METHODS:
        raise UsageError(f"unknown method {s.method!r}; choose one of: {', '.join(METHODS)}")
    if s.merge and s.method == "full":
        raise UsageError("--merge applies to --lora and --qlora (a --full run already saves a whole model)")
    base = require_model_folder(resolve_source(s.model))
    output = Path(s.output_dir).expanduser().resolve()
    if output == base.resolve() or output in base.resolve().parents:
        raise UsageError(
            f"--output {s.output_dir} is (or holds) the base model {s.model}: the adapter or merged weights would "
            "change what the base folder loads as. Choose another --output"
        )
    refuse_foreign_code(str(base), s.trust_remote_code)
    if s.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {s.max_length}")


def tokenizer_and_data(s: SFTSettings):
    """The tokenizer (with the guanaco chat template) and the data, less the rows that cannot train; prints how
    many rows `max_length` truncates and drops (data.fit_to_max_length counts as SFTTrainer will cut)."""
    tokenizer = set_chat_template(load_tokenizer(s.model, trust_remote_code=s.trust_remote_code))
    data = load_guanaco(s.data, text_column=s.text_column, completion_only=s.completion_only, limit=s.limit)
    data, report = fit_to_max_length(data, tokenizer, s.max_length, completion_only=s.completion_only)
    print(report.line(), flush=True)
    return tokenizer, data


def trainable_model(s: SFTSettings, tokenizer):
    """The base model (4-bit for QLoRA) with LoRA adapters, or the whole model for full fine-tuning."""
    get_peft_model = require("peft").get_peft_model
    try:
        # the adapter then names the base by its path
        model = load_model(str(Path(s.model).resolve()), s.method, trust_remote_code=s.trust_remote_code)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"{s.model}: cannot load the model: {error}") from error
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if s.method == "qlora":
        model = prepare_for_kbit(model, gradient_checkpointing=s.gradient_checkpointing)
    if s.method in ("lora", "qlora"):
        model = get_peft_model(model, lora_config(s.rank, s.alpha, s.lora_dropout, s.target_modules))
        disable_cpu_inference_repacking(model)
    return model


def sft_trainer(s: SFTSettings, model, tokenizer, dataset, callbacks=()):
    """TRL's `SFTTrainer` of `model` on `dataset` with the settings' arguments (`benchmarks.finetune` times it)."""
    trl = require("trl")
    SFTConfig, SFTTrainer = trl.SFTConfig, trl.SFTTrainer
    config = SFTConfig(
        **base_training_arguments(s),
        num_train_epochs=s.epochs,
        warmup_steps=0,
        max_length=s.max_length,
        packing=s.packing,
        completion_only_loss=s.completion_only if s.completion_only else None,
        # TRL defaults gradient checkpointing to on; set under the running transformers' name, so it is not renamed
        **{ACTIVATION_CHECKPOINTING: s.gradient_checkpointing},
        logging_steps=min(s.logging_steps, s.max_steps) if s.max_steps > 0 else s.logging_steps,  # short runs log
        disable_tqdm=s.disable_tqdm,
        dataset_text_field="text",
    )
    return SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks)
    )


def _save(s: SFTSettings, trained, tokenizer) -> bool:
    """The adapter, or the merged or fully trained model, and the tokenizer; returns whether a whole model was
    saved."""
    output = Path(s.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    merged = s.method == "full"
    if s.method != "full" and s.merge:
        if s.method == "qlora":
            # the nf4 base cannot hold merged weights exactly: merge into the float base model instead
            from peft import PeftModel

            trained.save_pretrained(str(output / "adapter"))
            base = load_model(str(Path(s.model).resolve()), "lora", trust_remote_code=s.trust_remote_code)
            trained = PeftModel.from_pretrained(base, str(output / "adapter"))
        trained = trained.merge_and_unload()
        merged = True
    trained.save_pretrained(str(output))
    save_tokenizer(tokenizer, output)
    return merged


def _summarise(s: SFTSettings, result: SFTResult) -> dict:
    """training_summary.json and the model card; returns the summary."""
    lora = s.method != "full"
    training = {
        "method": s.method,
        "data": s.data,
        "steps": result.steps,
        "epochs": s.epochs,
        "max_steps": s.max_steps,
        "rank": s.rank if lora else None,
        "alpha": (s.alpha if s.alpha is not None else 2 * s.rank) if lora else None,
        "target_modules": list(s.target_modules) if not isinstance(s.target_modules, str) else s.target_modules,
        "learning_rate": s.learning_rate,
        "max_length": s.max_length,
        "packing": s.packing,
        "completion_only_loss": s.completion_only,
        "gradient_checkpointing": s.gradient_checkpointing,
        "batch_size": s.batch_size,
        "merged": result.merged,
        "train_loss": result.train_loss,
        "trainable_parameters": result.trainable_parameters,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
    }
    output = Path(s.output_dir)
    summary = {"base_model": str(s.model), **training}
    write_training_summary(output, summary)
    if s.write_card:
        _write_card(output, s.model, s.data, training)
    return summary


def _write_card(output: Path, model: str, data: str, training: dict) -> None:
    """README.md by the project's model card writer (retnet_hf.model_card), where the package has one."""
    try:
        from .model_card import write_model_card
    except ImportError:
        return
    local = Path(data).exists()
    what = "merged model" if training.get("merged") else "LoRA adapter" if training["method"] != "full" else "model"
    try:
        write_model_card(
            output,
            model_name=output.resolve().name,
            base_model=None if is_local(model) else str(model),  # metadata takes Hub ids only
            datasets=None if local else [data],
            local_data=[data] if local else None,
            training=training,
            source=f"`retnet-hf sft` ({training['method']}) of the model folder {model}; this folder holds the {what}.",
        )
    except Exception as error:  # the weights are saved; a card problem must not lose the run
        warnings.warn(f"could not write the model card in {output}: {error}")
