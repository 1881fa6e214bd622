"""Benchmarks of issue 6: RetNet against what users would pick instead, measured the same way in one run.

The logic of `scripts/bench_decode.py`, `scripts/bench_prefill.py` and `scripts/bench_torchscale.py` lives here;
the scripts only parse arguments, print and plot. Nothing here asserts a timing: the functions return rows
(dicts) that the scripts print as tables.

- `same_size_llama(retnet_config)`: a `LlamaConfig` (SDPA attention, KV cache) with RetNet's vocabulary, width and
  depth and the MLP width chosen so that the parameter counts agree within 3%.
- `retnet_125m_config()`: d 768, 12 layers, key head dim 256 (3 heads), dv = f = 1104, vocab 32000, untied:
  124,373,760 parameters; its `same_size_llama` (12 heads of 64, intermediate size 1696) has exactly as many,
  since 4 d^2 + 3 d 1696 = 2 d^2 + 6 d 1104.
- `measure_bandwidth()`: GB/s of a large tensor read (`x.sum()`), the ceiling of memory-bound decoding.
- `PeakMemory`: peak memory increase inside a `with` block: bytes of live tensors (CUDA: the allocator's peak;
  CPU: torch.profiler's allocation events), and on the CPU also the sampled RSS.
- `decode_benchmark`, `prefill_benchmark`, `torchscale_benchmark`: the three measurements.
"""

import copy
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import threading
import time
import types
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .model import CACHE_NAME, RetNetCache, RetNetConfig, RetNetForCausalLM, enable_activation_checkpointing


MB = 1024**2
GB = 1024**3

# --------------------------------------------------------------------------------------------------------------
# Model sizes


def retnet_parameter_count(config: RetNetConfig) -> int:
    """Exact parameter count of `RetNetForCausalLM(config)` (tied embeddings counted once)."""
    d, dv, f = config.decoder_embed_dim, config.decoder_value_embed_dim, config.decoder_ffn_embed_dim
    value_head_dim = dv // config.decoder_retention_heads
    per_layer = 2 * d * d + 3 * d * dv + 3 * d * f + 2 * d + (value_head_dim if config.group_norm_affine else 0)
    count = config.vocab_size * d + config.decoder_layers * per_layer
    count += d if config.layernorm_embedding else 0
    count += d if config.decoder_normalize_before else 0
    count += 0 if config.share_decoder_input_output_embed else config.vocab_size * d
    return count


def llama_parameter_count(config) -> int:
    """Exact parameter count of `LlamaForCausalLM(config)` without biases (tied embeddings counted once)."""
    d, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attention = d * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    per_layer = attention + 3 * d * inner + 2 * d
    count = config.vocab_size * d + config.num_hidden_layers * per_layer + d
    return count + (0 if config.tie_word_embeddings else config.vocab_size * d)


def retnet_125m_config(**overrides) -> RetNetConfig:
    """A ~125M-parameter RetNet: d 768, 12 layers, 3 heads (key head dim 256, torchscale's presets), dv = f = 1104
    (value head dim 368), vocab 32000, untied output: 124,373,760 parameters. Swish GLU, embeddings scaled by
    sqrt(d), chunk 512, as torchscale's training presets."""
    fields = dict(
        vocab_size=32000,
        decoder_embed_dim=768,
        decoder_value_embed_dim=1104,
        decoder_ffn_embed_dim=1104,
        decoder_layers=12,
        decoder_retention_heads=3,
        activation_fn="swish",
        recurrent_chunk_size=512,
        share_decoder_input_output_embed=False,
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def retnet_base_config(**overrides) -> RetNetConfig:
    """torchscale's `retnet_base` preset (d 512, dv = f = 864, 6 layers, 2 heads), vocab 32000, untied: 51.8M."""
    fields = dict(
        vocab_size=32000,
        decoder_embed_dim=512,
        decoder_value_embed_dim=864,
        decoder_ffn_embed_dim=864,
        decoder_layers=6,
        decoder_retention_heads=2,
        activation_fn="swish",
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


def retnet_tiny_config(**overrides) -> RetNetConfig:
    """A tiny RetNet for `--quick` runs: d 64, dv = f = 96, 2 layers, 2 heads, vocab 512, chunk 32."""
    fields = dict(
        vocab_size=512,
        decoder_embed_dim=64,
        decoder_value_embed_dim=96,
        decoder_ffn_embed_dim=96,
        decoder_layers=2,
        decoder_retention_heads=2,
        activation_fn="swish",
        recurrent_chunk_size=32,
    )
    fields.update(overrides)
    return RetNetConfig(**fields)


SIZES: Dict[str, Callable[..., RetNetConfig]] = {
    "125m": retnet_125m_config,
    "base": retnet_base_config,
    "tiny": retnet_tiny_config,
}


def same_size_llama(
    retnet_config: RetNetConfig, head_dim: int = 64, multiple_of: int = 16, tolerance: float = 0.03, **overrides
):
    """A `LlamaConfig` with RetNet's vocabulary, width, depth and embedding tying, SDPA attention, full multi-head
    attention (as many KV heads as heads) of `head_dim` (or fewer when the width is smaller), and the MLP width
    (a multiple of `multiple_of` where that stays within `tolerance`) that brings its parameter count closest to
    RetNet's. Raises ValueError if the counts still differ by more than `tolerance`."""
    from transformers import LlamaConfig

    d, layers = retnet_config.decoder_embed_dim, retnet_config.decoder_layers
    head_dim = min(head_dim, d)
    while d % head_dim:
        head_dim //= 2
    heads = d // head_dim
    target = retnet_parameter_count(retnet_config)
    fields = dict(
        vocab_size=retnet_config.vocab_size,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        intermediate_size=1,
        hidden_act="silu",
        rms_norm_eps=retnet_config.layernorm_eps,
        tie_word_embeddings=retnet_config.share_decoder_input_output_embed,
        max_position_embeddings=65536,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=retnet_config.pad_token_id,
        bos_token_id=retnet_config.bos_token_id,
        eos_token_id=retnet_config.eos_token_id,
        attn_implementation="sdpa",
    )
    fields.update(overrides)
    config = LlamaConfig(**fields)
    fixed = llama_parameter_count(config) - 3 * d * layers * config.intermediate_size
    exact = max(1.0, (target - fixed) / (3 * d * layers))
    for step in (multiple_of, 1):
        config.intermediate_size = max(step, int(round(exact / step)) * step)
        if abs(llama_parameter_count(config) / target - 1) <= tolerance:
            return config
    raise ValueError(
        f"No Llama MLP width brings the parameter count within {tolerance:.0%} of RetNet's {target:,}: the "
        f"attention alone ({fixed:,} with the embeddings) is too large; use a smaller head count or a wider model."
    )


def build_models(retnet_config: RetNetConfig, llama_config=None, dtype=torch.float32, device="cpu", seed=0):
    """`(RetNetForCausalLM, LlamaForCausalLM)` in eval mode with random weights (the timings do not depend on them)."""
    from transformers import LlamaForCausalLM

    llama_config = llama_config or same_size_llama(retnet_config)
    torch.manual_seed(seed)
    retnet = RetNetForCausalLM(retnet_config).to(device=device, dtype=dtype).eval()
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(llama_config).to(device=device, dtype=dtype).eval()
    return retnet, llama


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# The machine


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(size_mb: int = 512, repeats: int = 7, device="cpu") -> float:
    """Memory read bandwidth in GB/s (10^9 bytes per second): the median over `repeats` of the time of `x.sum()`
    over a float32 tensor of `size_mb` MiB (after one warm-up), with torch's current thread count."""
    x = torch.ones(size_mb * MB // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    nbytes = x.numel() * x.element_size()
    del x
    return nbytes / statistics.median(times) / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(bandwidth_gbs: Optional[float] = None, device="cpu") -> str:
    """A few lines naming the machine: CPU (or GPU), cores, threads, memory, versions, measured bandwidth."""
    import transformers

    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"]
    try:
        import psutil

        lines[0] += f", RAM {psutil.virtual_memory().total / GB:.1f} GiB"
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    lines.append(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.system()} {platform.release()}"
    )
    if bandwidth_gbs is not None:
        lines.append(f"measured read bandwidth: {bandwidth_gbs:.1f} GB/s (median of x.sum() over a large tensor)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Peak memory


def _release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (optional: it can take a good part of a second with transformers loaded) and ask glibc to
    hand freed heap pages back, so that RSS starts from a clean level."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory increase inside a `with` block, in bytes (`.peak_bytes`, `.peak_mb`): the most bytes of
    tensors alive at once beyond those alive at the start.

    On CUDA: `torch.cuda.max_memory_allocated` after a reset, minus what was allocated at the start. On the CPU:
    the allocation and free events that `torch.profiler` records (`profile_memory=True`), summed in time order:
    exact, like the CUDA figure, and independent of how much freed memory glibc keeps mapped. The CPU also reports
    `.rss_peak_bytes` (`.rss_peak_mb`): a background thread samples the process's resident set size every
    `interval` seconds, over its level at the start; what the machine sees, but a peak shorter than the interval
    can be missed and memory that malloc keeps after a free counts as used. `.method` says how `peak_bytes` was
    taken.
    """

    def __init__(self, device="cpu", interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self.rss_peak_bytes = None
        self.method = "CUDA max_memory_allocated" if self.device.type == "cuda" else "tensor bytes from torch.profiler"

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB

    @property
    def rss_peak_mb(self) -> Optional[float]:
        return None if self.rss_peak_bytes is None else self.rss_peak_bytes / MB

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        _release_freed_memory(collect=False)
        self._process = psutil.Process()
        self._rss_start = self._rss_peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        self._profiler.__exit__(*exc)
        self._stop.set()
        self._thread.join()
        self._rss_peak = max(self._rss_peak, self._process.memory_info().rss)
        self.rss_peak_bytes = max(0, self._rss_peak - self._rss_start)
        if exc[0] is None:
            events = [
                event
                for event in self._profiler.profiler.kineto_results.events()
                if event.name() == "[memory]" and event.device_type() == torch._C._autograd.DeviceType.CPU
            ]
            live = peak = 0
            for event in sorted(events, key=lambda event: event.start_ns()):
                live += event.nbytes()
                peak = max(peak, live)
            self.peak_bytes = peak


def available_memory_bytes(device="cpu") -> int:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available


# --------------------------------------------------------------------------------------------------------------
# Helpers for timing and byte counts


def timed(fn: Callable[[], object], device="cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights read per decode step: every parameter except the input embedding table, of which a step
    reads only a few rows (a tied table is read in full as the output layer)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings().weight
    tied = embedding.data_ptr() == output.data_ptr()
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embedding)


def cache_bytes(cache) -> int:
    """Bytes held by a `RetNetCache` (states) or a transformers KV cache (keys and values)."""
    if isinstance(cache, RetNetCache):
        return sum(t.numel() * t.element_size() for state in cache.states if state is not None for t in state)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def retnet_state_bytes(config: RetNetConfig, batch: int = 1) -> int:
    """Bytes of the recurrent state (float32 S [H, D, Dv] and scale [H] per layer), whatever the context."""
    heads = config.decoder_retention_heads
    per_layer = heads * (config.decoder_embed_dim // heads) * (config.decoder_value_embed_dim // heads) + heads
    return batch * config.decoder_layers * per_layer * 4


def llama_kv_bytes(config, context: int, batch: int = 1, element_size: int = 4) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * batch * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * element_size


def _next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# Decode


def _restorable_cache(model, prefilled, context: int, batch: int):
    """The prefilled batch-1 cache expanded to `batch` rows, and a function giving a cache at `context` tokens
    to decode from (RetNet: a copy of the small state; Llama: the same KV cache cropped back to `context`)."""
    cache = copy.deepcopy(prefilled)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    if isinstance(cache, RetNetCache):
        return cache, lambda: copy.deepcopy(cache)

    def cropped():
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)
        return cache

    return cache, cropped


def decode_benchmark(
    retnet: RetNetForCausalLM,
    llama: nn.Module,
    contexts: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 16,
    repeats: int = 1,
    bandwidth_gbs: Optional[float] = None,
    paths: Sequence[str] = ("generate", "step"),
    memory_fraction: float = 0.8,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Decode speed and memory of RetNet (recurrent state) against Llama (DynamicCache KV cache, SDPA).

    For each context: a random prompt of `context` tokens is prefilled at batch 1 in one forward pass (RetNet in
    its default chunkwise form, Llama with SDPA; `prefill s`), and the cache is repeated to each batch size (the
    cost of a decode step does not depend on the tokens). Then, from that cache:

    - `generate`: `model.generate(min_new_tokens=N, max_new_tokens=N, do_sample=False)` on the prompt plus its
      next token (N = `new_tokens`), with a streamer recording when each new token arrives; per step
      `(t_last - t_first) / (N - 1)`, which leaves out generate's set-up and the first forward;
    - `step`: a bare loop of N calls `model(token, **{CACHE_NAME: cache}, use_cache=True)`, greedy.

    Each row also gives the ceiling of memory-bound decoding: per step the weights (`weight_bytes_per_token`)
    and every row's state or KV cache at that context are read once, so
    `ideal tokens/s = batch * bandwidth / (weight bytes + batch * cache bytes)`, and `% ceiling` = measured /
    ideal. `cache MB` is the state or KV cache at the context (exact); `decode MB` is that plus the peak
    increase (`PeakMemory`) during a separate, untimed step loop of N tokens (a growing KV cache, activations,
    copies); the same figure is given for both paths.
    A (model, context, batch) point whose cache would not fit in `memory_fraction` of the available memory is
    skipped (a row with `skipped` set). Returns one row per model, context, batch and path.
    """
    device = next(retnet.parameters()).device
    models = (("RetNet", retnet), ("Llama", llama))
    weight_bytes = {name: weight_bytes_per_token(model) for name, model in models}
    element_size = next(llama.parameters()).element_size()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for context in contexts:
        prompt = torch.randint(0, retnet.config.vocab_size, (1, context), generator=generator).to(device)
        for name, model in models:
            needed = {
                batch: (
                    retnet_state_bytes(model.config, batch)
                    if name == "RetNet"
                    # the batch's cache, the batch-1 prefill and its copy, one layer's torch.cat per step
                    else llama_kv_bytes(model.config, context + new_tokens, batch, element_size)
                    * (1 + 2 / batch + 2 / model.config.num_hidden_layers)
                )
                for batch in batch_sizes
            }
            limit = memory_fraction * available_memory_bytes(device)
            if min(needed.values()) > limit:
                for batch in batch_sizes:
                    rows += [_skipped_row(name, context, batch, path, needed[batch]) for path in paths]
                continue
            log(f"decode: {name} prefill of {context} tokens")
            result = {}
            with torch.no_grad():
                prefill_seconds = timed(
                    lambda: result.update(out=model(prompt, use_cache=True, logits_to_keep=1)), device
                )
            out = result.pop("out")
            prefilled, first = getattr(out, CACHE_NAME), _next_token(out.logits)
            del out
            for batch in batch_sizes:
                if needed[batch] > memory_fraction * available_memory_bytes(device):
                    rows += [_skipped_row(name, context, batch, path, needed[batch]) for path in paths]
                    continue
                log(f"decode: {name} context {context} batch {batch}")
                cache, fresh = _restorable_cache(model, prefilled, context, batch)
                held = cache_bytes(cache)
                ids = torch.cat([prompt, first], dim=1).expand(batch, -1).contiguous()
                seconds = {}
                with torch.no_grad():
                    if "generate" in paths:
                        seconds["generate"] = _generate_seconds_per_token(
                            model, ids, fresh, new_tokens, repeats, device
                        )
                    if "step" in paths:
                        seconds["step"] = _step_seconds_per_token(
                            model, first.expand(batch, -1), fresh, new_tokens, repeats, device
                        )
                    # memory in a pass of its own, so that the sampling thread cannot disturb the timings
                    with PeakMemory(device) as peak:
                        _step_seconds_per_token(model, first.expand(batch, -1), fresh, new_tokens, 1, device)
                cache_at_context = retnet_state_bytes(model.config, batch) if name == "RetNet" else held
                ideal = batch * bandwidth_gbs * 1e9 / (weight_bytes[name] + cache_at_context) if bandwidth_gbs else None
                for path, per_token in seconds.items():
                    tokens_per_second = batch / per_token if per_token > 0 else float("nan")
                    rows.append(
                        {
                            "model": name,
                            "context": context,
                            "batch": batch,
                            "path": path,
                            "ms/step": per_token * 1e3,
                            "tokens/s": tokens_per_second,
                            "ideal tokens/s": ideal,
                            "% ceiling": 100 * tokens_per_second / ideal if ideal else None,
                            "cache MB": cache_at_context / MB,
                            "decode MB": (held + peak.peak_bytes) / MB,
                            "prefill s": prefill_seconds,
                            "skipped": None,
                        }
                    )
                del cache, fresh
            del prefilled
            _release_freed_memory()
    return rows


def _skipped_row(name, context, batch, path, needed_bytes) -> dict:
    return {
        "model": name,
        "context": context,
        "batch": batch,
        "path": path,
        "skipped": f"needs ~{needed_bytes / GB:.1f} GiB",
    }


class TimingStreamer:
    """A generate() streamer that only records when each new token arrives (`put` is called with the prompt
    first, then once per step with the new tokens)."""

    def __init__(self):
        self.times: List[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _generate_seconds_per_token(model, ids, fresh_cache, new_tokens, repeats, device) -> float:
    """Per decode step inside `generate()`: the time between the first and the last new token (as a streamer
    receives them) over the steps between them, so generate's set-up, the first forward (the prompt's last token)
    and its wrap-up are left out; the median over `repeats` calls after a warm-up call."""
    mask = torch.ones_like(ids)
    steps = max(new_tokens, 2)

    def run():
        streamer = TimingStreamer()
        model.generate(
            ids,
            attention_mask=mask,
            **{CACHE_NAME: fresh_cache()},
            do_sample=False,
            min_new_tokens=steps,
            max_new_tokens=steps,
            pad_token_id=0,
            streamer=streamer,
        )
        assert len(streamer.times) == steps, len(streamer.times)
        return (streamer.times[-1] - streamer.times[0]) / (steps - 1)

    run()  # warm-up
    return statistics.median(run() for _ in range(repeats))


def _step_seconds_per_token(model, first, fresh_cache, new_tokens, repeats, device) -> float:
    def run():
        cache, token = fresh_cache(), first

        def loop():
            nonlocal token
            for _ in range(new_tokens):
                token = _next_token(model(token, **{CACHE_NAME: cache}, use_cache=True).logits)

        return timed(loop, device) / new_tokens

    return statistics.median(run() for _ in range(repeats))


def decode_summary(rows: List[dict]) -> List[str]:
    """The issue's decode goals, read off the rows where they were measured."""

    def value(model, context, batch, path, key="ms/step"):
        for row in rows:
            if (row["model"], row["context"], row["batch"], row["path"]) == (
                model,
                context,
                batch,
                path,
            ) and not row.get("skipped"):
                return row[key]
        return None

    lines = []
    contexts = sorted({row["context"] for row in rows})
    batches = sorted({row["batch"] for row in rows})
    paths = [p for p in ("step", "generate") if any(row["path"] == p for row in rows)]
    if len(contexts) > 1:
        for batch in batches:
            for path in paths:
                first, last = value("RetNet", contexts[0], batch, path), value("RetNet", contexts[-1], batch, path)
                if first and last:
                    lines.append(
                        f"RetNet {path} batch {batch}: per-token time at {contexts[-1]} is "
                        f"{last / first:.2f}x that at {contexts[0]} (goal: within 5%)"
                    )
    for context in contexts:
        for batch in batches:
            for path in paths:
                ours, theirs = (
                    value("RetNet", context, batch, path, "tokens/s"),
                    value("Llama", context, batch, path, "tokens/s"),
                )
                if ours and theirs:
                    lines.append(
                        f"context {context} batch {batch} {path}: RetNet/Llama tokens/s = "
                        f"{ours / theirs:.2f}x" + (" (goal at 8k: >= 1.8x)" if context == 8192 else "")
                    )
    for model in ("RetNet", "Llama"):
        for context in contexts:
            for batch in batches:
                step, generate = value(model, context, batch, "step"), value(model, context, batch, "generate")
                if step and generate:
                    lines.append(
                        f"{model} context {context} batch {batch}: generate() per token is "
                        f"{100 * (generate / step - 1):+.0f}% vs the step loop (goal: within 15%)"
                    )
    return lines


# --------------------------------------------------------------------------------------------------------------
# Prefill and training


PREFILL_VARIANTS = ("RetNet parallel", "RetNet chunkwise", "Llama SDPA")


def estimate_prefill_bytes(
    variant: str, model: nn.Module, length: int, batch: int, backward: bool, gradient_checkpointing: bool = False
) -> int:
    """A rough upper estimate of the peak memory of one prefill point (to skip those that cannot fit): the
    [T, T]-sized retention tensors of the parallel form (about 4 alive per layer, all layers' when training),
    [T, chunk] ones of the chunkwise form, activations of about 28 widths per token and layer when training
    (with `gradient_checkpointing`, one layer's and one width per other layer), and the logits (three copies when
    training)."""
    config = model.config
    element = next(model.parameters()).element_size()
    layers, width = config.num_hidden_layers, config.hidden_size
    logits = batch * (length if backward else 1) * config.vocab_size * 4 * (3 if backward else 1)
    kept_layers = 1 if gradient_checkpointing or not backward else layers
    activations = batch * length * width * element * (28 * kept_layers + (layers if gradient_checkpointing else 0))
    total = logits + activations + (parameter_count(model) * 4 * 2 if backward else 0)
    if variant.startswith("RetNet"):
        heads = config.decoder_retention_heads
        span = length if variant == "RetNet parallel" else min(length, config.recurrent_chunk_size)
        total += batch * heads * length * span * 4 * 4 * kept_layers
    return total


def prefill_benchmark(
    retnet: RetNetForCausalLM,
    llama: nn.Module,
    lengths: Sequence[int],
    batch_size: int = 1,
    modes: Sequence[str] = ("forward", "forward+backward"),
    variants: Sequence[str] = PREFILL_VARIANTS,
    repeats: int = 1,
    memory_fraction: float = 0.7,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Time and peak memory of a forward pass (`torch.no_grad()`, `use_cache=True`, logits of the last token only:
    a prefill) and of forward+backward (labels = inputs, full logits, `loss.backward()`, no cache: a training
    step without the optimiser; with `gradient_checkpointing`, both models recompute each layer in the backward
    pass) against the sequence length, for RetNet's parallel and chunkwise forms
    (`retention_form=`) and Llama with SDPA. Median of `repeats` after one warm-up at the shortest length.
    A point is skipped when its predicted peak exceeds `memory_fraction` of the available memory: predicted from
    the peak measured at the previous length of the same variant and mode, scaled with the length (squared for
    the parallel form) and by 1.3 for safety, or at the first length by `estimate_prefill_bytes`. (There is no
    swap on these machines: running out of memory would kill this process, or a neighbour's.) One row per
    variant, length and mode."""
    device = next(retnet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    models = {
        "RetNet parallel": (retnet, "parallel"),
        "RetNet chunkwise": (retnet, "chunkwise"),
        "Llama SDPA": (llama, None),
    }
    rows = []

    def run(model, form, ids, mode):
        extra = {} if form is None else {"retention_form": form}
        if mode == "forward":
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1, **extra)
        else:  # a training step (both models have dropout 0, so train mode changes nothing but checkpointing)
            model.train()
            model.zero_grad(set_to_none=True)
            try:
                model(ids, labels=ids, use_cache=False, **extra).loss.backward()
            finally:
                model.zero_grad(set_to_none=True)
                model.eval()

    if gradient_checkpointing:
        for model in (retnet, llama):
            enable_activation_checkpointing(model)
    shortest = min(lengths)
    measured_peaks = {}
    for mode in modes:
        for variant in variants:  # warm-up
            model, form = models[variant]
            run(model, form, torch.zeros(batch_size, shortest, dtype=torch.long, device=device), mode)
    for length in sorted(lengths):
        ids = torch.randint(0, retnet.config.vocab_size, (batch_size, length), generator=generator).to(device)
        for mode in modes:
            for variant in variants:
                model, form = models[variant]
                previous = measured_peaks.get((variant, mode))
                if previous is None:
                    needed = estimate_prefill_bytes(
                        variant, model, length, batch_size, mode != "forward", gradient_checkpointing
                    )
                else:
                    power = 2 if variant == "RetNet parallel" else 1
                    needed = int(1.3 * previous[1] * (length / previous[0]) ** power)
                row = {"variant": variant, "length": length, "batch": batch_size, "mode": mode}
                _release_freed_memory(collect=False)  # memory malloc still holds from the previous point is free
                if needed > memory_fraction * available_memory_bytes(device):
                    rows.append({**row, "skipped": f"needs ~{needed / GB:.1f} GiB"})
                    continue
                log(f"prefill: {variant} {mode} {length} tokens")
                times, peaks = [], []
                for _ in range(repeats):
                    with PeakMemory(device) as peak:
                        times.append(timed(lambda: run(model, form, ids, mode), device))
                    peaks.append(peak)
                seconds = statistics.median(times)
                peak_bytes = max(peak.peak_bytes for peak in peaks)
                rss_bytes = None if peaks[0].rss_peak_bytes is None else max(peak.rss_peak_bytes for peak in peaks)
                measured_peaks[(variant, mode)] = (length, peak_bytes)
                rows.append(
                    {
                        **row,
                        "seconds": seconds,
                        "tokens/s": batch_size * length / seconds,
                        "peak MB": peak_bytes / MB,
                        "skipped": None,
                        "RSS MB": None if rss_bytes is None else rss_bytes / MB,
                    }
                )
        _release_freed_memory()
    return rows


def chunkwise_crossover(rows: List[dict], mode: str, chunk_size: int = 0) -> Optional[int]:
    """The shortest measured length from which RetNet's chunkwise form is faster than its parallel form at every
    longer length where both were measured (None if it never is). Lengths up to `chunk_size` are left out: there
    the chunkwise form is the parallel form (one chunk), and any difference is noise."""
    seconds = {}
    for row in rows:
        if (
            row["mode"] == mode
            and not row.get("skipped")
            and row["variant"] in PREFILL_VARIANTS[:2]
            and row["length"] > chunk_size
        ):
            seconds.setdefault(row["length"], {})[row["variant"]] = row["seconds"]
    both = sorted(length for length, pair in seconds.items() if len(pair) == 2)
    crossover = None
    for length in reversed(both):
        if seconds[length]["RetNet chunkwise"] < seconds[length]["RetNet parallel"]:
            crossover = length
        else:
            break
    return crossover


def prefill_summary(rows: List[dict], chunk_size: int = 0) -> List[str]:
    """Where chunkwise overtakes parallel (lengths above one chunk), what was skipped, and the peak memory of
    chunkwise against Llama at the longest length, per mode."""
    lines = []
    for mode in sorted({row["mode"] for row in rows}, key=len):
        lengths = sorted({row["length"] for row in rows if row["mode"] == mode})
        parallel = [row for row in rows if row["mode"] == mode and row["variant"] == "RetNet parallel"]
        if parallel:  # the crossover and the parallel form's skips, where that form was asked for
            measured = sorted(row["length"] for row in parallel if not row.get("skipped"))
            longer = [length for length in measured if length > chunk_size]
            crossover = chunkwise_crossover(rows, mode, chunk_size)
            if crossover is not None:
                lines.append(
                    f"{mode}: chunkwise (chunk {chunk_size}) is faster than parallel from {crossover} tokens on"
                )
            elif longer:
                lines.append(
                    f"{mode}: chunkwise (chunk {chunk_size}) is not faster than parallel at the longest "
                    f"length both ran ({longer[-1]})"
                )
            else:
                lines.append(f"{mode}: no length above one chunk ({chunk_size}) where both forms ran")
            if len(measured) < len(parallel):
                lines.append(f"{mode}: parallel form skipped (memory) above {measured[-1] if measured else 0} tokens")
        peak = {
            row["variant"]: row["peak MB"]
            for row in rows
            if row["mode"] == mode and row["length"] == lengths[-1] and not row.get("skipped")
        }
        if "RetNet chunkwise" in peak and "Llama SDPA" in peak:
            ratio = peak["RetNet chunkwise"] / peak["Llama SDPA"]
            lines.append(
                f"{mode} at {lengths[-1]} tokens: peak tensor memory RetNet chunkwise "
                f"{peak['RetNet chunkwise']:.0f} MB vs Llama SDPA {peak['Llama SDPA']:.0f} MB ({ratio:.2f}x)"
            )
    return lines


# --------------------------------------------------------------------------------------------------------------
# torchscale 0.3.0


def _drop_path(x, drop_prob=0.0, training=False):
    """timm's stochastic depth: zero whole samples with probability drop_prob, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def import_torchscale():
    """`(torchscale RetNetConfig, RetNetDecoder)`. torchscale's `retnet.py` imports `timm.models.layers.drop_path`
    (stochastic depth) and timm does not import next to the CPU torch wheel, so a stand-in module is placed in
    `sys.modules` for the import and removed afterwards. Raises ImportError if torchscale is not installed
    (`pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`)."""
    names = ("timm", "timm.models", "timm.models.layers")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    stubbed = "timm.models.layers" not in sys.modules
    if stubbed:
        timm, models, layers = (types.ModuleType(name) for name in names)
        layers.drop_path = _drop_path
        timm.models, models.layers = models, layers
        sys.modules.update(dict(zip(names, (timm, models, layers))))
    try:
        from torchscale.architecture.config import RetNetConfig as TorchscaleConfig
        from torchscale.architecture.retnet import RetNetDecoder
    finally:
        if stubbed:
            for name in names:
                sys.modules.pop(name, None)
            sys.modules.update(saved)
    return TorchscaleConfig, RetNetDecoder


def torchscale_twin(model: RetNetForCausalLM) -> nn.Module:
    """A torchscale 0.3.0 `RetNetDecoder` with `model`'s configuration and weights (keys renamed: `model.X` -> `X`,
    `lm_head` -> `output_projection`), in eval mode, same dtype and device."""
    config = model.config
    if config.rotary_style != "torchscale" or not config.retention_normalization or config.group_norm_affine:
        raise ValueError("torchscale has only the torchscale rotary style, normalised retention, no norm weight.")
    TorchscaleConfig, RetNetDecoder = import_torchscale()
    fields = dict(
        vocab_size=config.vocab_size,
        decoder_embed_dim=config.decoder_embed_dim,
        decoder_value_embed_dim=config.decoder_value_embed_dim,
        decoder_ffn_embed_dim=config.decoder_ffn_embed_dim,
        decoder_layers=config.decoder_layers,
        decoder_retention_heads=config.decoder_retention_heads,
        activation_fn=config.activation_fn,
        dropout=0.0,
        no_scale_embedding=config.no_scale_embedding,
        layernorm_embedding=config.layernorm_embedding,
        layernorm_eps=config.layernorm_eps,
        deepnorm=config.deepnorm,
        share_decoder_input_output_embed=config.share_decoder_input_output_embed,
        recurrent_chunk_size=config.recurrent_chunk_size,
    )
    args = TorchscaleConfig(**fields)
    decoder = RetNetDecoder(args, embed_tokens=nn.Embedding(config.vocab_size, config.decoder_embed_dim))
    state = {
        ("output_projection.weight" if key == "lm_head.weight" else key[len("model.") :]): value
        for key, value in model.state_dict().items()
    }
    decoder.load_state_dict(state, strict=True)
    parameter = next(model.parameters())
    return decoder.to(device=parameter.device, dtype=parameter.dtype).eval()


def torchscale_benchmark(
    model: RetNetForCausalLM,
    prompt_lengths: Sequence[int],
    decode_steps: int = 16,
    batch_size: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Ours against torchscale 0.3.0 on the same weights (`torchscale_twin`).

    Prompt: ours in one forward pass (default form: chunkwise, parallel within a chunk) against torchscale's
    incremental decoding, which takes one token per call (each call gets the whole prefix and an
    `incremental_state` dict, as its own generator does). Then `decode_steps` greedy steps of each from its
    state, fed the same tokens (ours' choice). `max rel diff` compares the logits of the last prompt token and of
    every decode step (relative to their largest magnitude) as a check that both run the same model."""
    decoder = torchscale_twin(model)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in prompt_lengths:
        prompt = torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator).to(device)
        log(f"torchscale: prompt of {length} tokens")
        with torch.no_grad():
            results = {}
            ours_prefill = timed(lambda: results.update(ours=model(prompt, use_cache=True, logits_to_keep=1)), device)
            state = {}

            def theirs_prompt():
                for t in range(length):
                    results["theirs"] = decoder(prompt[:, : t + 1], incremental_state=state)[0][:, -1]

            theirs_prefill = timed(theirs_prompt, device)
            cache, ours_logits = getattr(results["ours"], CACHE_NAME), results["ours"].logits[:, -1]
            differences = [_relative_difference(ours_logits, results["theirs"])]
            sequence, token = prompt, _next_token(results["ours"].logits)
            ours_steps, theirs_steps = [], []
            for _ in range(decode_steps):
                sequence = torch.cat([sequence, token], dim=1)
                ours_steps.append(
                    timed(
                        lambda: results.update(ours=model(token, **{CACHE_NAME: cache}, use_cache=True).logits[:, -1]),
                        device,
                    )
                )
                theirs_steps.append(
                    timed(lambda: results.update(theirs=decoder(sequence, incremental_state=state)[0][:, -1]), device)
                )
                differences.append(_relative_difference(results["ours"], results["theirs"]))
                token = results["ours"].argmax(-1, keepdim=True)
        rows.append(
            {
                "prompt": length,
                "batch": batch_size,
                "ours prefill s": ours_prefill,
                "torchscale prompt s": theirs_prefill,
                "prefill speed-up": theirs_prefill / ours_prefill,
                "ours ms/step": 1e3 * statistics.median(ours_steps) if ours_steps else None,
                "torchscale ms/step": 1e3 * statistics.median(theirs_steps) if theirs_steps else None,
                "max rel diff": max(differences),
            }
        )
    return rows


def _relative_difference(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


# --------------------------------------------------------------------------------------------------------------
# Output


def format_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """A markdown table of `columns`; a skipped row shows its reason in the first empty column."""

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return ""
        if isinstance(value, float):
            if math.isnan(value):
                return "nan"
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [cell(row, column) for column in columns]
        if row.get("skipped"):
            empty = next((i for i, c in enumerate(cells) if c == ""), len(cells) - 1)
            cells[empty] = f"skipped: {row['skipped']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_decode(rows: List[dict], path: str, title: str = "") -> str:
    """Tokens/s and decode memory against the context, one line per model, path and batch; saved as PNG."""
    plt = _pyplot()
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5))
    rows = [row for row in rows if not row.get("skipped")]
    for model, colour in (("RetNet", "tab:blue"), ("Llama", "tab:red")):
        for batch, marker in zip(sorted({row["batch"] for row in rows}), "os^v"):
            for kind, style in (("step", "-"), ("generate", "--")):
                points = sorted(
                    (row["context"], row["tokens/s"], row["decode MB"])
                    for row in rows
                    if (row["model"], row["batch"], row["path"]) == (model, batch, kind)
                )
                if points:
                    x, y, m = zip(*points)
                    label = f"{model} b{batch} {kind}"
                    speed.plot(x, y, style, color=colour, marker=marker, label=label)
                    if kind == "step":
                        memory.plot(x, m, style, color=colour, marker=marker, label=f"{model} b{batch}")
            ideal = sorted(
                (row["context"], row["ideal tokens/s"])
                for row in rows
                if row["ideal tokens/s"] and (row["model"], row["batch"], row["path"]) == (model, batch, "step")
            )
            if ideal:
                x, y = zip(*ideal)
                speed.plot(x, y, ":", color=colour, alpha=0.5, label=f"{model} b{batch} ceiling")
    for axis, label in ((speed, "tokens/s"), (memory, "decode memory (MB)")):
        _log_axes(axis, "context (tokens)", label)
    figure.suptitle(title or "Decode: RetNet vs Llama (KV cache)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_prefill(rows: List[dict], path: str, title: str = "") -> str:
    """Time and peak memory against the sequence length, per variant and mode; saved as PNG."""
    plt = _pyplot()
    modes = sorted({row["mode"] for row in rows}, key=len)
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
    colours = dict(zip(PREFILL_VARIANTS, ("tab:orange", "tab:blue", "tab:red")))
    for column, mode in enumerate(modes):
        for variant in PREFILL_VARIANTS:
            points = sorted(
                (row["length"], row["seconds"], row["peak MB"])
                for row in rows
                if row["mode"] == mode and row["variant"] == variant and not row.get("skipped")
            )
            if points:
                x, t, m = zip(*points)
                axes[0][column].plot(x, t, "-o", color=colours[variant], label=variant)
                axes[1][column].plot(x, m, "-o", color=colours[variant], label=variant)
        for row, label in ((0, "seconds"), (1, "peak tensor memory (MB)")):
            axes[row][column].set_title(mode)
            _log_axes(axes[row][column], "sequence length (tokens)", label, fontsize=8)
    figure.suptitle(title or "Prefill and training step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_torchscale(rows: List[dict], path: str, title: str = "") -> str:
    """Prompt time and decode step time against the prompt length, ours vs torchscale; saved as PNG."""
    plt = _pyplot()
    figure, (prompt, step) = plt.subplots(1, 2, figsize=(12, 5))
    x = [row["prompt"] for row in rows]
    prompt.plot(x, [row["ours prefill s"] for row in rows], "-o", label="retnet_hf, one pass (chunkwise)")
    prompt.plot(x, [row["torchscale prompt s"] for row in rows], "-o", label="torchscale 0.3.0, token by token")
    step.plot(x, [row["ours ms/step"] for row in rows], "-o", label="retnet_hf")
    step.plot(x, [row["torchscale ms/step"] for row in rows], "-o", label="torchscale 0.3.0")
    for axis, label in ((prompt, "prompt time (s)"), (step, "decode step after the prompt (ms)")):
        _log_axes(axis, "prompt length (tokens)", label, fontsize=8)
    figure.suptitle(title or "retnet_hf vs torchscale 0.3.0, same weights")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def parse_ints(text: str) -> List[int]:
    """`"512,2k,16k"` or `"512 2048"` -> `[512, 2048, 16384]` (a `k` suffix multiplies by 1024)."""
    values = []
    for item in text.replace(",", " ").split():
        item = item.strip().lower()
        values.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return values


def add_common_arguments(parser, default_size: str = "125m") -> None:
    """Options every benchmark script takes: size, dtype, threads, bandwidth buffer, seed, output folder, quick."""
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=default_size,
        help=f"model size: 125m (RetNet 124.4M and a Llama of the same size), base (torchscale's "
        f"retnet_base preset, 51.8M), tiny (0.16M, for --quick); default {default_size}",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights' dtype (RetNet's state stays float32); default float32",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--bandwidth-mb",
        type=int,
        default=512,
        help="size of the tensor whose x.sum() measures the bandwidth (MiB); default 512",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results", help="folder for the PNG, the table (.md) and rows (.json)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and tiny settings (a smoke test; finishes in seconds)"
    )


def prepare_run(args) -> dict:
    """Apply thread count and seed, measure the bandwidth, and describe the machine; returns `dtype`,
    `bandwidth` (GB/s) and `header` (text for the top of the output)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    bandwidth = measure_bandwidth(args.bandwidth_mb, device=args.device)
    return {
        "dtype": getattr(torch, args.dtype),
        "bandwidth": bandwidth,
        "header": machine_description(bandwidth, args.device),
    }


def publish(out: str, stem: str, preamble: List[str], body: List[str], rows: List[dict], png: str) -> List[str]:
    """Print `body` (table, notes), write `preamble` + `body` to `out/stem.md` and the rows to `out/stem.json`,
    and say where they and the plot `png` went; returns the two paths."""
    import json

    print("\n" + "\n\n".join(body))
    paths = [os.path.join(out, f"{stem}.md"), os.path.join(out, f"{stem}.json")]
    with open(paths[0], "w") as handle:
        handle.write("\n".join(preamble) + "\n\n" + "\n\n".join(body) + "\n")
    with open(paths[1], "w") as handle:
        json.dump(rows, handle, indent=1, default=str)
    print(f"\nsaved {png}, {', '.join(paths)}")
    return paths


def _log_axes(axis, xlabel: str, ylabel: str, fontsize: int = 7) -> None:
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=fontsize)


def describe_models(retnet: nn.Module, llama: Optional[nn.Module] = None) -> str:
    config = retnet.config
    text = (
        f"RetNet: d {config.decoder_embed_dim}, dv {config.decoder_value_embed_dim}, f "
        f"{config.decoder_ffn_embed_dim}, {config.decoder_layers} layers, {config.decoder_retention_heads} heads,"
        f" vocab {config.vocab_size}, chunk {config.recurrent_chunk_size}: {parameter_count(retnet):,} parameters,"
        f" {next(retnet.parameters()).dtype}"
    )
    if llama is not None:
        lc = llama.config
        text += (
            f"\nLlama: d {lc.hidden_size}, intermediate {lc.intermediate_size}, {lc.num_hidden_layers} layers, "
            f"{lc.num_attention_heads} heads of {lc.head_dim}, attention {lc._attn_implementation}: "
            f"{parameter_count(llama):,} parameters "
            f"({100 * (parameter_count(llama) / parameter_count(retnet) - 1):+.2f}%)"
        )
    return text


__all__ = [
    "PeakMemory",
    "SIZES",
    "TimingStreamer",
    "add_common_arguments",
    "parse_ints",
    "prepare_run",
    "publish",
    "available_memory_bytes",
    "build_models",
    "cache_bytes",
    "chunkwise_crossover",
    "decode_benchmark",
    "decode_summary",
    "describe_models",
    "format_table",
    "import_torchscale",
    "llama_kv_bytes",
    "llama_parameter_count",
    "machine_description",
    "measure_bandwidth",
    "parameter_count",
    "plot_decode",
    "plot_prefill",
    "plot_torchscale",
    "prefill_benchmark",
    "prefill_summary",
    "retnet_125m_config",
    "retnet_base_config",
    "retnet_parameter_count",
    "retnet_state_bytes",
    "retnet_tiny_config",
    "same_size_llama",
    "torchscale_benchmark",
    "torchscale_twin",
    "weight_bytes_per_token",
]
