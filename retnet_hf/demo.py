"""The demo: train a small RetNet for a couple of minutes, reload it through the Auto classes, generate, and show
on this machine that the three forms agree and that decoding costs the same per token at any context length."""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .model import CACHE_NAME
from .options import positive_float, positive_int
from .pretraining import PretrainSettings, pretrain


def default_corpus() -> List[str]:
    """The embedded default text: this package's own source files, docstrings and all (nothing is downloaded)."""
    return [str(p) for p in sorted(Path(__file__).parent.rglob("*.py"))]


@torch.no_grad()
def forms_disagreement(model, input_ids: torch.Tensor) -> dict:
    """Max |logit difference| of the chunkwise and recurrent forms against the parallel form, relative to its scale."""
    ref = model(input_ids, retention_form="parallel").logits
    return {
        form: ((model(input_ids, retention_form=form).logits - ref).abs().max() / ref.abs().max()).item()
        for form in ("chunkwise", "recurrent")
    }


@torch.no_grad()
def decode_seconds_per_token(model, contexts: Sequence[int], steps: int = 32, rounds: int = 3) -> List[float]:
    """Per context: prefill that many random tokens in one pass, then time `steps` one-token steps with the
    recurrent state. Contexts are measured in turn, `rounds` times, and the median is kept."""
    states = {}
    for context in contexts:
        prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
        out = model(prompt, use_cache=True)
        states[context] = (getattr(out, CACHE_NAME), out.logits[:, -1:].argmax(-1))
    timings = {context: [] for context in contexts}
    for _ in range(rounds):
        for context in contexts:
            cache, token = states[context]
            out = model(token, cache=cache, use_cache=True)  # warm-up step
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            timings[context].append((time.perf_counter() - start) / steps)
            states[context] = (cache, token)
    return [sorted(timings[context])[rounds // 2] for context in contexts]


def run_demo(
    texts: Optional[Sequence[str]] = None,
    output_dir: str = "retnet-demo",
    overwrite: bool = False,
    max_seconds: float = 120.0,
    max_steps: int = 1500,
    preset: str = "tiny",
    prompt: str = "def ",
    short_context: int = 128,
    long_context: int = 4096,
    print_fn=print,
) -> dict:
    texts = list(texts) if texts else default_corpus()
    print_fn(f"Training a '{preset}' RetNet for up to {max_seconds:.0f} s on {len(texts)} file(s) ...")
    result = pretrain(
        PretrainSettings(
            texts=tuple(texts),
            output_dir=output_dir,
            preset=preset,
            vocab_size=1024,
            block_size=128,
            batch_size=8,
            learning_rate=2e-3,
            max_steps=max_steps,
            max_seconds=max_seconds,
            eval_steps=50,
            save_steps=50,
            early_stopping_patience=3,  # a small corpus: keep the best evaluated model, not an over-fitted last one
            resume=False,
            overwrite=overwrite,
        )
    )

    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    sample_ids = model.generate(**inputs, max_new_tokens=60, do_sample=True, top_p=0.9, temperature=0.8)
    sample = tokenizer.decode(sample_ids[0], skip_special_tokens=True)

    chunk = model.config.recurrent_chunk_size  # the probe spans three chunks and part of a fourth, so the
    length = 3 * chunk + chunk // 3 + 1  # chunkwise form carries its state across chunk boundaries
    probe = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    disagreement = forms_disagreement(model, probe)
    spans = f"{length} tokens, {math.ceil(length / chunk)} chunks of {chunk}"
    short, long = decode_seconds_per_token(model, [short_context, long_context])

    rows = [
        ("model", f"{result.num_parameters / 1e6:.2f}M parameters, folder {output_dir}"),
        ("training", f"{result.steps} steps in {result.seconds:.0f} s, last train loss {result.train_loss:.3f}"),
        ("kept model", f"step {result.kept_step} (the lowest evaluation loss; evaluated every 50 steps)"),
        ("evaluation", f"loss {result.eval_loss:.3f}, perplexity {result.eval_perplexity:.1f} (the kept model)"),
        ("chunkwise vs parallel", f"max |diff| / max |logit| = {disagreement['chunkwise']:.1e} ({spans})"),
        ("recurrent vs parallel", f"max |diff| / max |logit| = {disagreement['recurrent']:.1e} ({length} tokens)"),
        (f"decode at {short_context} tokens", f"{short * 1e3:.2f} ms/token"),
        (f"decode at {long_context} tokens", f"{long * 1e3:.2f} ms/token ({long / short:.2f}x the short context)"),
    ]
    width = max(len(name) for name, _ in rows)
    print_fn("")
    print_fn(f"Sample (prompt {prompt!r}, reloaded with AutoModelForCausalLM):")
    print_fn(sample)
    print_fn("")
    for name, value in rows:
        print_fn(f"{name:<{width}}  {value}")
    print_fn(f"\nLoss curve: {Path(output_dir) / 'loss.png'}")
    return {
        "result": result,
        "sample": sample,
        "disagreement": disagreement,
        "decode_short": short,
        "decode_long": long,
    }


# -------------------------------------------------------------------------------------------- `retnet-hf demo`


@dataclass
class DemoSettings:
    """One demo; `retnet-hf demo`'s options are made from these fields."""

    text: Optional[str] = field(
        default=None,
        metadata=dict(help="train on this text file instead of the embedded corpus (this package's source)"),
    )
    output_dir: str = field(
        default="retnet-demo", metadata=dict(flag="--output", help="folder for the trained model (default retnet-demo)")
    )
    max_seconds: float = field(
        default=120.0, metadata=dict(parse=positive_float, help="training time budget (default 120)")
    )
    max_steps: int = field(
        default=1500, metadata=dict(parse=positive_int, help="training steps at most (default 1500)")
    )
    overwrite: bool = field(
        default=False,
        metadata=dict(negatable=False, help="write into a non-empty --output that is not an earlier run's"),
    )


def demo_command(settings: DemoSettings) -> None:
    """`retnet-hf demo`: train a small RetNet for a couple of minutes and show its claims."""
    s = settings
    run_demo(
        texts=[s.text] if s.text else None,
        output_dir=s.output_dir,
        overwrite=s.overwrite,
        max_seconds=s.max_seconds,
        max_steps=s.max_steps,
    )
