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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .data import DEFAULT_DATASET, load_guanaco, save_tokenizer, set_chat_template
from .errors import UsageError
from .model import ACTIVATION_CHECKPOINTING, LORA_TARGET_MODULES, enable_activation_checkpointing
from .reports import plot_loss_curve


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


def load_model(folder: str, method: str = "lora", dtype: Optional[torch.dtype] = None):
    """The model of `folder` for `method` "lora" / "full" (float) or "qlora" (nf4, double quant) / "lora8" (int8)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"trust_remote_code": True}
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
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


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


METHODS = ("lora", "qlora", "full")


def sft(
    model: str,
    output_dir: str,
    data: str = DEFAULT_DATASET,
    method: str = "lora",
    rank: int = 16,
    alpha: Optional[int] = None,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = tuple(LORA_TARGET_MODULES),
    learning_rate: float = 2e-4,
    max_length: int = 512,
    packing: bool = False,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    completion_only: bool = False,
    gradient_checkpointing: bool = False,
    merge: bool = False,
    save_steps: int = 200,
    logging_steps: int = 10,
    text_column: str = "text",
    limit: Optional[int] = None,
    seed: int = 0,
    resume: bool = True,
    disable_tqdm: bool = False,
    write_card: bool = True,
) -> SFTResult:
    """Fine-tune the model folder `model` on guanaco-form chat data with TRL's `SFTTrainer`.

    `method`: "lora" (float base, LoRA on `target_modules`), "qlora" (4-bit nf4 base, LoRA), "full" (every weight).
    Checkpoints go to `output_dir/checkpoints` and a run resumes from the newest one; `output_dir` gets the adapter
    (loads with `PeftModel.from_pretrained` or, where peft is installed, `AutoModelForCausalLM`), or with
    `merge=True` (or `method="full"`) a whole model that loads with `AutoModelForCausalLM`; the tokenizer with the
    guanaco chat template, `loss.png` and `training_summary.json`.
    """
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    try:
        from peft import get_peft_model
        from trl import SFTConfig, SFTTrainer
    except ImportError as error:
        raise UsageError(f"fine-tuning needs the train extras (pip install 'retnet-hf[train]'): {error}") from error

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise UsageError(f"{model}: not a model folder (no config.json)")
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {max_length}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as error:
        raise UsageError(f"{model}: cannot load its tokenizer: {error}") from error
    set_chat_template(tokenizer)
    dataset = load_guanaco(data, text_column=text_column, completion_only=completion_only, limit=limit)

    torch.manual_seed(seed)
    on_gpu = torch.cuda.is_available()
    try:
        net = load_model(str(folder.resolve()), method)  # the adapter then names the base by its full path
    except Exception as error:
        raise UsageError(f"{model}: cannot load the model: {error}") from error
    if net.get_input_embeddings().num_embeddings < len(tokenizer):
        net.resize_token_embeddings(len(tokenizer))
    if method == "qlora":
        net = prepare_for_kbit(net, gradient_checkpointing=gradient_checkpointing)
    if method in ("lora", "qlora"):
        net = get_peft_model(net, lora_config(rank, alpha, lora_dropout, target_modules))
        disable_cpu_inference_repacking(net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

    output = Path(output_dir)
    checkpoints = output / "checkpoints"
    config = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=epochs,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_length=max_length,
        packing=packing,
        completion_only_loss=completion_only if completion_only else None,
        # TRL defaults gradient checkpointing to on; set under the running transformers' name, so it is not renamed
        **{ACTIVATION_CHECKPOINTING: gradient_checkpointing},
        logging_steps=min(logging_steps, max_steps) if max_steps > 0 else logging_steps,  # short runs log too
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=disable_tqdm,
        dataset_text_field="text",
    )
    trainer = SFTTrainer(model=net, args=config, train_dataset=dataset, processing_class=tokenizer)
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    start = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - start

    output.mkdir(parents=True, exist_ok=True)
    trained = trainer.model
    merged = False
    if method != "full" and merge:
        if method == "qlora":
            # the nf4 base cannot hold merged weights exactly: merge into the float base model instead
            from peft import PeftModel

            trained.save_pretrained(str(output / "adapter"))
            base = load_model(str(folder.resolve()), "lora")
            trained = PeftModel.from_pretrained(base, str(output / "adapter"))
        trained = trained.merge_and_unload()
        merged = True
    trained.save_pretrained(str(output))
    save_tokenizer(tokenizer, output)
    plot_loss_curve(trainer.state.log_history, output / "loss.png")
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = SFTResult(
        output_dir=output,
        steps=trainer.state.global_step,
        train_loss=losses[-1] if losses else train_output.training_loss,
        losses=losses,
        seconds=seconds,
        merged=merged or method == "full",
        trainable_parameters=trainable,
        resumed_from=last,
        metrics=dict(train_output.metrics),
    )
    training = {
        "method": method,
        "data": data,
        "steps": result.steps,
        "epochs": epochs,
        "max_steps": max_steps,
        "rank": rank if method != "full" else None,
        "alpha": (alpha if alpha is not None else 2 * rank) if method != "full" else None,
        "target_modules": list(target_modules) if not isinstance(target_modules, str) else target_modules,
        "learning_rate": learning_rate,
        "max_length": max_length,
        "packing": packing,
        "completion_only_loss": completion_only,
        "gradient_checkpointing": gradient_checkpointing,
        "batch_size": batch_size,
        "merged": result.merged,
        "train_loss": result.train_loss,
        "trainable_parameters": trainable,
        "resumed_from": last,
        "seconds": round(seconds, 1),
    }
    (output / "training_summary.json").write_text(json.dumps({"base_model": str(model), **training}, indent=2))
    if write_card:
        _write_card(output, model, data, training)
    return result


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
            base_model=None if Path(model).exists() else str(model),  # metadata takes Hub ids only
            datasets=None if local else [data],
            local_data=[data] if local else None,
            training=training,
            source=f"`retnet-hf sft` ({training['method']}) of the model folder {model}; this folder holds the {what}.",
        )
    except Exception as error:  # the weights are saved; a card problem must not lose the run
        warnings.warn(f"could not write the model card in {output}: {error}")
