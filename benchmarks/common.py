"""What every benchmark shares: the machine, the memory meter, timing, the one same-size Llama, sizes, tables and
plots. The benchmarks are not part of the installed package; run them from the repository root, e.g.
`python -m benchmarks.decode` (each prints its own `--help`). Nothing here asserts a timing: the functions return
rows (dicts) that the scripts print as tables.

- `same_size_llama(retnet_config)`: a `LlamaConfig` (SDPA attention, KV cache) with RetNet's vocabulary, width and
  depth and the MLP width chosen so that the parameter counts agree within 3%. At the 125m size (d 768, 12 layers,
  key head dim 256, dv = f = 1104, vocab 32000, untied: 124,373,760 parameters) its Llama (12 heads of 64,
  intermediate size 1696) has exactly as many, since 4 d^2 + 3 d 1696 = 2 d^2 + 6 d 1104.
- `measure_bandwidth()`: GB/s of a large tensor read (`x.sum()`); `measure_read_bandwidth()`: the fastest read
  plain PyTorch kernels reach (best of a matrix-vector product, a [1, k] x [k, n] product and a sum over one
  matrix), the decode benchmark's ceiling.
- `PeakMemory`: peak memory increase inside a `with` block: bytes of live tensors (CUDA: the allocator's peak;
  CPU: torch.profiler's allocation events), and on the CPU also the sampled RSS.
- `retention_backend(model, name)`: RetNet's `config.retention_backend` set for a `with` block ("torch": the
  package's PyTorch retention, "fla": flash-linear-attention's Triton kernels); `fla_backend_unavailable(device,
  dtype)` says why the fla backend cannot run there (None when it can).
- `flash_attention_2_llama(...)` and `fla_retnet(...)`: the optional rivals of the training benchmark, a Llama with
  FlashAttention-2 and flash-linear-attention's own RetNet (`conversion.fla_config_fields`: its config fields for our size),
  each a model or a sentence saying why it cannot be built here.
- `publish` writes a benchmark's table and rows at its end, `save_partial` the rows so far while it runs (a run
  stopped by a time limit keeps them), both through `write_results`; `error_summary` is an exception in a table cell.
- `interleaved_timings(measures, rounds)` and `paired_median_ratio`: timings taken side by side in rounds, and
  the median of their per-round ratio, so that a ratio compares figures taken moments apart (the shared machines
  these run on drift by 10% over seconds to minutes).
"""

import contextlib
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
from typing import Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from retnet_hf.conversion import fla_config_fields
from retnet_hf.model import RetNetCache, RetNetConfig, RetNetForCausalLM
from retnet_hf.model.fla_retention import fla_unavailable
from retnet_hf.presets import preset_config


MB = 1024**2


GB = 1024**3


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


# The sizes the benchmarks run at, from the package's presets: `--size`.
SIZES: Dict[str, dict] = {
    "125m": dict(preset="125m", vocab_size=32000),  # 124,373,760 parameters
    "base": dict(preset="retnet_base", vocab_size=32000),  # torchscale's retnet_base, 51.8M
    "tiny": dict(preset="tiny", vocab_size=512, recurrent_chunk_size=32),  # for --quick runs and the tests
}


def size_config(size: str, **overrides) -> RetNetConfig:
    """The `RetNetConfig` of a benchmark size (untied output, swish GLU, embeddings scaled by sqrt(d))."""
    fields = {**SIZES[size], **overrides}
    return preset_config(fields.pop("preset"), fields.pop("vocab_size"), **fields)


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


@contextlib.contextmanager
def retention_backend(model: nn.Module, name: Optional[str]) -> Iterator[None]:
    """RetNet's `config.retention_backend` (read at every forward call) set to `name` inside the block and restored
    after it; `name` None, or a model that is not ours, leaves the config alone."""
    config = model.config
    if name is None or not isinstance(config, RetNetConfig):
        yield
        return
    previous = getattr(config, "retention_backend", None)
    config.retention_backend = name
    try:
        yield
    finally:
        config.retention_backend = previous


def fla_backend_unavailable(device="cpu", dtype=torch.float32) -> Optional[str]:
    """Why RetNet's `retention_backend="fla"` cannot run its kernels on `device` in `dtype` (a sentence; the model
    would fall back to PyTorch), or None when it can."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    probe = torch.empty(1, 1, 1, device=device, dtype=dtype)
    return fla_unavailable(probe, "chunkwise", stateful=True)


def flash_attention_2_llama(retnet_config: RetNetConfig, dtype=torch.float32, device="cpu", seed=0):
    """The same-size Llama (`same_size_llama`, the weights of `build_models`' Llama: same seed) with transformers'
    `attn_implementation="flash_attention_2"`, or a sentence saying why it cannot run here: the flash-attn package
    (transformers' FlashAttention-2) needs a CUDA device and half precision."""
    from transformers import LlamaForCausalLM
    from transformers.utils import is_flash_attn_2_available

    if torch.device(device).type != "cuda":
        return "FlashAttention-2 needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-2 takes float16 or bfloat16, not {dtype} (--dtype bfloat16)"
    if not is_flash_attn_2_available():
        return (
            "the flash-attn package is not installed (it builds from source for the machine's torch; transformers' "
            "kernels-based FlashAttention downloads its kernel from the Hub, which this machine may not reach)"
        )
    torch.manual_seed(seed)
    config = same_size_llama(retnet_config, attn_implementation="flash_attention_2")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def fla_retnet(retnet_config: RetNetConfig, dtype=torch.float32, device="cpu", seed=0) -> Union[nn.Module, str]:
    """flash-linear-attention's own `RetNetForCausalLM` of our `retnet_config`'s size (`retnet_hf.conversion.fla_config_fields`), random
    weights, or a sentence saying why it cannot run here (its Triton kernels need a CUDA device)."""
    if torch.device(device).type != "cuda":
        return "flash-linear-attention's Triton kernels need a CUDA device"
    try:
        from fla.models import RetNetConfig as FlaRetNetConfig
        from fla.models import RetNetForCausalLM as FlaRetNetForCausalLM
    except ImportError as error:
        return f"flash-linear-attention does not import ({error})"
    torch.manual_seed(seed)
    model = FlaRetNetForCausalLM(FlaRetNetConfig(**fla_config_fields(retnet_config)))
    return model.to(device=device, dtype=dtype).eval()


def error_summary(error: BaseException, width: int = 160) -> str:
    """`"TypeName: the first line of the message"`, cut at `width` characters: for a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:width] if lines else ''}".rstrip(": ")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def measure_read_bandwidth(size_mb: int = 256, repeats: int = 7, device="cpu") -> Dict[str, float]:
    """GB/s (10^9 bytes per second) at which plain PyTorch kernels read one float32 matrix of `size_mb` MiB, 4096
    wide: `mv` (`torch.mv(W, x)`, W `[n, 4096]`), `vm` (`x @ W` with W seen as `[4096, n]`: the [1, k] x [k, n]
    product of a one-token step), `sum` (`W.sum()`), each the median over `repeats` after a warm-up, and `best`,
    the fastest of the three: the read bandwidth a decode step can hope for."""
    width = 4096
    matrix = torch.ones(max(1, size_mb * MB // 4 // width), width, dtype=torch.float32, device=device)
    wide = matrix.view(width, -1)
    column, row = torch.ones(width, device=device), torch.ones(1, width, device=device)
    probes = {"mv": lambda: torch.mv(matrix, column), "vm": lambda: row @ wide, "sum": matrix.sum}
    nbytes = matrix.numel() * matrix.element_size()
    result = {}
    for name, probe in probes.items():
        probe()
        times = []
        for _ in range(repeats):
            times.append(timed(probe, device))
        result[name] = nbytes / statistics.median(times) / 1e9
    result["best"] = max(result.values())
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The machine's load average over 1, 5 and 15 minutes, e.g. "0.12, 0.40, 0.35" ("n/a" where the system has
    none): on a shared machine, what else was running while the timings were taken."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


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


def release_freed_memory(collect: bool = True) -> None:
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

        release_freed_memory(collect=False)
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


def timed(fn: Callable[[], object], device="cpu") -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_timings(measures: Mapping[Hashable, Callable[[], float]], rounds: int) -> Dict[Hashable, List[float]]:
    """Takes several measurements side by side, for a machine whose speed drifts over seconds to minutes: `rounds`
    rounds, each calling every measure once, so that the figures of one round were taken moments apart. Round r
    calls them in `measures`' order rotated by r (it starts at the (r mod n)-th), so that none always runs first
    or always follows the same one. Each measure returns its own figure (e.g. seconds; see `timed`). Returns each
    key's `rounds` figures in round order: index i of two keys' lists comes from the same round, the pairs that
    `paired_median_ratio` compares."""
    keys = list(measures)
    figures: Dict[Hashable, List[float]] = {key: [] for key in keys}
    for index in range(rounds):
        start = index % len(keys) if keys else 0
        for key in keys[start:] + keys[:start]:
            figures[key].append(measures[key]())
    return figures


def paired_median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median over rounds of `numerators[i] / denominators[i]`, two keys' figures from `interleaved_timings`:
    a ratio of two things timed in the same rounds, which the drift of the machine between rounds does not bias
    (a ratio of two separately taken medians can pair a fast moment with a slow one). Raises ValueError if the
    two are empty or differ in length."""
    if not numerators or len(numerators) != len(denominators):
        raise ValueError(f"need two equally long, non-empty lists: {len(numerators)} and {len(denominators)} figures")
    return statistics.median(a / b for a, b in zip(numerators, denominators))


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


def next_token(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


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


def relative_difference(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, title: str, path: str) -> str:
    """Title, lay out, save as a PNG at `path` and close `figure`; returns `path`."""
    figure.suptitle(title)
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


def write_results(out: str, stem: str, preamble: List[str], body: List[str], rows) -> List[str]:
    """Write `preamble` + `body` to `out/stem.md` and `rows` to `out/stem.json`, printing nothing; returns the two
    paths."""
    import json

    paths = [os.path.join(out, f"{stem}.md"), os.path.join(out, f"{stem}.json")]
    with open(paths[0], "w") as handle:
        handle.write("\n".join(preamble) + "\n\n" + "\n\n".join(body) + "\n")
    with open(paths[1], "w") as handle:
        json.dump(rows, handle, indent=1, default=str)
    return paths


def publish(
    out: str, stem: str, preamble: List[str], body: List[str], rows: List[dict], png: Optional[str]
) -> List[str]:
    """Print `body` (table, notes), write `preamble` + `body` to `out/stem.md` and the rows to `out/stem.json`
    (`write_results`), and say where they and the plot `png` (if any) went; returns the two paths."""
    print("\n" + "\n\n".join(body))
    paths = write_results(out, stem, preamble, body, rows)
    print(f"\nsaved {', '.join(([png] if png else []) + paths)}")
    return paths


def save_partial(out: str, stem: str, preamble: List[str], rows: List[dict], columns: Sequence[str]) -> None:
    """Write the rows measured so far to `out/stem.md` (said to be partial) and `out/stem.json`, printing nothing:
    a run stopped part-way (a time limit) keeps what it had measured; `publish` overwrites both at the end."""
    note = "partial: the rows measured so far (the run had not finished when this was written)"
    write_results(out, stem, preamble, [format_table(rows, columns), note], rows)


def log_axes(axis, xlabel: str, ylabel: str, fontsize: int = 7) -> None:
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
            f"{parameters_versus(llama, retnet)}"
        )
    return text


def parameters_versus(model: nn.Module, reference: nn.Module) -> str:
    """`"N parameters (+x.xx%)"`: `model`'s parameter count and how far it is from `reference`'s."""
    count = parameter_count(model)
    return f"{count:,} parameters ({100 * (count / parameter_count(reference) - 1):+.2f}%)"
