"""Prefill and training benchmark: time and peak memory of forward (no_grad) and forward+backward against the
sequence length, for RetNet's parallel and chunkwise forms and a same-size Llama with SDPA, in one run.

On a GPU (--device cuda, --dtype bfloat16) three more variants can be asked for with --variants: "RetNet chunkwise
(fla)" (the same model with retention_backend="fla": flash-linear-attention's Triton kernels; the two plain RetNet
variants run retention_backend="torch"), "Llama FlashAttention-2" (the same Llama with
attn_implementation="flash_attention_2", where the flash-attn package is installed) and "fla RetNet"
(flash-linear-attention's own RetNetForCausalLM of the same size). One that cannot run here is a row that says why,
and so is one that fails. Peak memory there is CUDA's max_memory_allocated, and the timings synchronize the device.

This script prints the machine, the models, a markdown
table and where chunkwise overtakes parallel, and saves prefill.png, prefill.md and prefill.json into --out.
Points that would not fit in memory (the parallel form's [T, T] matrices) are skipped and say so. Per length and
mode each variant first runs once for its peak memory (untimed), then the variants are timed side by side in
rounds, each of which runs every variant once, so that `x Llama time` (the median of each round's RetNet/Llama
ratio) compares timings taken moments apart (the shared machines these run on drift by 10% over minutes).

Full run (defaults: 125M, lengths 512 to 16k doubling, batch 1, both modes, 3 rounds): estimated 40 minutes on an
idle 2-core CPU with 23.5 GB (each point runs four times, its memory run and 3 rounds; one run of every point
took about 10 minutes in all), most of it the parallel form's forward at 8k (about 2 minutes a run). There the
memory guard skips the parallel form's longest points and forward+backward at 16k (measured: 14.6 GB of tensors
for RetNet, 17.0 GB for Llama, in float32) and says so. To measure 16k training on such a machine (one run of each
point took about 6 minutes in all: estimated 24 with the memory run and 3 rounds):
MALLOC_MMAP_THRESHOLD_=131072 python -m benchmarks.prefill --modes forward+backward \
    --variants "RetNet chunkwise,Llama SDPA" --lengths 8k,16k --memory-fraction 1.3
(the fixed malloc threshold keeps the RSS at the tensor peak). --gradient-checkpointing makes 16k training take
about 7 GB for either model (then the logits dominate).
Quick run (tiny model, seconds): python -m benchmarks.prefill --quick
"""

import argparse
import functools
import os
import statistics
import sys
from typing import Callable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from retnet_hf.model import RetNetForCausalLM, enable_activation_checkpointing

from .common import (
    GB,
    MB,
    PeakMemory,
    add_common_arguments,
    available_memory_bytes,
    build_models,
    describe_models,
    error_summary,
    fla_backend_unavailable,
    fla_retnet,
    flash_attention_2_llama,
    format_table,
    interleaved_timings,
    log_axes,
    paired_median_ratio,
    parameter_count,
    parameters_versus,
    parse_ints,
    prepare_run,
    publish,
    pyplot,
    release_freed_memory,
    retention_backend,
    save_figure,
    save_partial,
    size_config,
    timed,
)


PREFILL_VARIANTS = ("RetNet parallel", "RetNet chunkwise", "Llama SDPA")  # the default variants
# opt-in (--variants), for a GPU: RetNet with fla's kernels, Llama with FlashAttention-2, fla's own RetNet
FLA_CHUNKWISE, LLAMA_FLASH_ATTENTION_2, FLA_RETNET = "RetNet chunkwise (fla)", "Llama FlashAttention-2", "fla RetNet"
OPTIONAL_VARIANTS = (FLA_CHUNKWISE, LLAMA_FLASH_ATTENTION_2, FLA_RETNET)
ALL_VARIANTS = PREFILL_VARIANTS + OPTIONAL_VARIANTS
# variant -> (retention form, retention backend) of our RetNet
RETNET_VARIANTS = {
    "RetNet parallel": ("parallel", "torch"),
    "RetNet chunkwise": ("chunkwise", "torch"),
    FLA_CHUNKWISE: ("chunkwise", "fla"),
}


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
    if variant in RETNET_VARIANTS:
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
    rounds: int = 3,
    memory_fraction: float = 0.7,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    log: Callable[[str], None] = lambda message: None,
    others: Optional[Mapping[str, Union[nn.Module, str]]] = None,
    progress: Callable[[List[dict]], None] = lambda rows: None,
) -> List[dict]:
    """Time and peak memory of a forward pass (`torch.no_grad()`, `use_cache=True`, logits of the last token only:
    a prefill) and of forward+backward (labels = inputs, full logits, `loss.backward()`, no cache: a training
    step without the optimiser; with `gradient_checkpointing`, both models recompute each layer in the backward
    pass) against the sequence length, for RetNet's parallel and chunkwise forms
    (`retention_form=`, with `retention_backend="torch"`) and Llama with SDPA; and, where asked for in
    `variants`, RetNet's chunkwise form with `retention_backend="fla"` and the models of `others`: "Llama
    FlashAttention-2" and "fla RetNet", each a model or a sentence saying why it is not there. A variant that
    cannot run on this device, or raises, gives rows that say why (`skipped`), and the others go on; so does a
    point that runs out of CUDA memory.

    After one warm-up of every variant and mode at the shortest length, per length and mode: each variant runs
    once inside `PeakMemory` (`peak MB`: tensor bytes, `RSS MB`: the sampled resident set, both over the start;
    that run is untimed, since the profiler and the sampler disturb timings), then the variants are timed side by
    side in `rounds` rounds (`interleaved_timings`: each round runs every variant once, in a rotating order), so
    that the figures of one round were taken moments apart on a machine whose speed drifts. `seconds` is the
    median over rounds (`seconds by round`: each round's); `x Llama time` (every variant's rows but Llama
    SDPA's, where it ran too) is the median over rounds of the variant's seconds over Llama SDPA's in the same
    round (`paired_median_ratio`; below 1: the variant is faster).
    A point is skipped when its predicted peak exceeds `memory_fraction` of the available memory: predicted from
    the peak measured at the previous length of the same variant and mode, scaled with the length (squared for
    the parallel form) and by 1.3 for safety, or at the first length by `estimate_prefill_bytes`; one variant runs
    at a time, so that peak is all that is alive. (There is no swap on these machines: running out of memory
    would kill this process, or a neighbour's.) One row per variant, length and mode; `progress` gets the rows so
    far after each length."""
    device = next(retnet.parameters()).device
    dtype = next(retnet.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    models = {variant: (retnet, form, backend) for variant, (form, backend) in RETNET_VARIANTS.items()}
    models["Llama SDPA"] = (llama, None, None)
    unavailable = {}  # variant -> why it has no figures
    if FLA_CHUNKWISE in variants:
        reason = fla_backend_unavailable(device, dtype)
        if reason:
            unavailable[FLA_CHUNKWISE] = reason
    for variant in (LLAMA_FLASH_ATTENTION_2, FLA_RETNET):  # built by the caller (`others`)
        if variant in variants:
            other = (others or {}).get(variant, "not built")
            if isinstance(other, str):
                unavailable[variant] = other
            else:
                models[variant] = (other, None, None)
    rows = []

    def run(model, form, backend, ids, mode):
        extra = {} if form is None else {"retention_form": form}
        with retention_backend(model, backend):
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

    def failed(variant, error) -> None:
        unavailable[variant] = f"failed: {error_summary(error)}"
        log(f"prefill: {variant} {unavailable[variant]}")

    if gradient_checkpointing:
        for variant in variants:
            if variant in models and variant not in unavailable:
                enable_activation_checkpointing(models[variant][0])
    shortest = min(lengths)
    measured_peaks = {}
    for mode in modes:
        for variant in variants:  # warm-up
            if variant in unavailable:
                continue
            try:
                run(*models[variant], torch.zeros(batch_size, shortest, dtype=torch.long, device=device), mode)
            except Exception as error:  # one variant that cannot run here must not cost the others their figures
                failed(variant, error)
    for length in sorted(lengths):
        ids = torch.randint(0, retnet.config.vocab_size, (batch_size, length), generator=generator).to(device)
        for mode in modes:
            skipped, peaks = {}, {}
            for variant in variants:
                if variant in unavailable:
                    skipped[variant] = unavailable[variant]
                    continue
                model = models[variant][0]
                previous = measured_peaks.get((variant, mode))
                if previous is None:
                    needed = estimate_prefill_bytes(
                        variant, model, length, batch_size, mode != "forward", gradient_checkpointing
                    )
                else:
                    power = 2 if variant == "RetNet parallel" else 1
                    needed = int(1.3 * previous[1] * (length / previous[0]) ** power)
                release_freed_memory(collect=False)  # memory malloc still holds from the previous point is free
                if needed > memory_fraction * available_memory_bytes(device):
                    skipped[variant] = f"needs ~{needed / GB:.1f} GiB"
                    continue
                # memory in a run of its own (the profiler and the sampling thread disturb timings), which is also
                # this point's warm-up
                log(f"prefill: {variant} {mode} {length} tokens, memory")
                try:
                    with PeakMemory(device) as peak:
                        run(*models[variant], ids, mode)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    skipped[variant] = "out of CUDA memory"
                    continue
                except Exception as error:
                    failed(variant, error)
                    skipped[variant] = unavailable[variant]
                    continue
                peaks[variant] = peak
                measured_peaks[(variant, mode)] = (length, peak.peak_bytes)
            if peaks:
                log(f"prefill: {', '.join(peaks)} {mode} {length} tokens, {rounds} rounds")
            seconds = interleaved_timings(
                {
                    variant: functools.partial(timed, functools.partial(run, *models[variant], ids, mode), device)
                    for variant in peaks
                },
                rounds,
            )
            for variant in variants:
                row = {"variant": variant, "length": length, "batch": batch_size, "mode": mode}
                if variant in skipped:
                    rows.append({**row, "skipped": skipped[variant]})
                    continue
                median = statistics.median(seconds[variant])
                versus_llama = None
                if variant != "Llama SDPA" and "Llama SDPA" in seconds:
                    versus_llama = paired_median_ratio(seconds[variant], seconds["Llama SDPA"])
                rss_bytes = peaks[variant].rss_peak_bytes
                rows.append(
                    {
                        **row,
                        "seconds": median,
                        "tokens/s": batch_size * length / median,
                        "x Llama time": versus_llama,
                        "peak MB": peaks[variant].peak_mb,
                        "skipped": None,
                        "RSS MB": None if rss_bytes is None else rss_bytes / MB,
                        "seconds by round": seconds[variant],
                    }
                )
        release_freed_memory()
        progress(rows)
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
    """Where chunkwise overtakes parallel (lengths above one chunk), what was skipped, each RetNet form's time
    against Llama's at the longest length where both ran (the rows' paired `x Llama time`), and the peak memory of
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
        for variant in [v for v in ALL_VARIANTS if v != "Llama SDPA"]:
            paired = sorted(
                (row["length"], row["x Llama time"])
                for row in rows
                if row["mode"] == mode and row["variant"] == variant and row.get("x Llama time")
            )
            if paired:
                length, ratio = paired[-1]
                lines.append(
                    f"{mode} at {length} tokens: {variant} takes {ratio:.2f}x the time of Llama SDPA, paired per round"
                )
        peak = {
            row["variant"]: row["peak MB"]
            for row in rows
            if row["mode"] == mode and row["length"] == lengths[-1] and not row.get("skipped")
        }
        for variant in [v for v in ALL_VARIANTS if v not in ("Llama SDPA", "RetNet parallel")]:
            if variant in peak and peak.get("Llama SDPA"):
                ratio = peak[variant] / peak["Llama SDPA"]
                lines.append(
                    f"{mode} at {lengths[-1]} tokens: peak tensor memory {variant} "
                    f"{peak[variant]:.0f} MB vs Llama SDPA {peak['Llama SDPA']:.0f} MB ({ratio:.2f}x)"
                )
    return lines


def plot_prefill(rows: List[dict], path: str, title: str = "") -> str:
    """Time and peak memory against the sequence length, per variant and mode; saved as PNG."""
    plt = pyplot()
    modes = sorted({row["mode"] for row in rows}, key=len)
    figure, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
    colours = dict(zip(ALL_VARIANTS, ("tab:orange", "tab:blue", "tab:red", "tab:cyan", "tab:pink", "tab:green")))
    for column, mode in enumerate(modes):
        for variant in ALL_VARIANTS:
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
            log_axes(axes[row][column], "sequence length (tokens)", label, fontsize=8)
    return save_figure(plt, figure, title or "Prefill and training step", path)


COLUMNS = ["variant", "length", "batch", "mode", "seconds", "tokens/s", "x Llama time", "peak MB", "RSS MB"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--lengths", type=parse_ints, default=None, help="sequence lengths, default '512,1k,2k,4k,8k,16k'"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--modes", default="forward,forward+backward", help="default 'forward,forward+backward'")
    parser.add_argument(
        "--variants",
        default=",".join(PREFILL_VARIANTS),
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)}; default '{','.join(PREFILL_VARIANTS)}'",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="RetNet chunk size (default: the config's, 512)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds: each times every variant of a length and mode once, side by side; medians and paired "
        "ratios over them; default 3",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer in the backward pass (both models); it lets 16k training at "
        "125M float32 fit in about 7 GB, where without it each needs 15 GB or more",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="skip a point when its predicted peak (the peak at the previous length, scaled, times "
        "1.3) exceeds this fraction of the available memory; default 0.7",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.lengths = args.lengths or ([32, 128] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    args.modes = args.modes.replace(" ", "").split(",")
    args.variants = [variant.strip() for variant in args.variants.split(",")]
    unknown = [variant for variant in args.variants if variant not in ALL_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = prepare_run(args)
    overrides = {} if args.chunk_size is None else {"recurrent_chunk_size": args.chunk_size}
    retnet_config = size_config(args.size, **overrides)
    retnet, llama = build_models(retnet_config, dtype=run["dtype"], device=args.device, seed=args.seed)
    builders = {LLAMA_FLASH_ATTENTION_2: flash_attention_2_llama, FLA_RETNET: fla_retnet}
    others = {
        variant: builders[variant](retnet_config, dtype=run["dtype"], device=args.device, seed=args.seed)
        for variant in builders
        if variant in args.variants
    }
    models_text = describe_models(retnet, llama)
    for variant, other in others.items():
        models_text += f"\n{variant}: " + (
            f"not run: {other}" if isinstance(other, str) else parameters_versus(other, retnet)
        )
    settings = (
        f"settings: size {args.size}, {args.dtype}, device {args.device}, variants {args.variants}, "
        f"lengths {args.lengths}, batch {args.batch_size}, "
        f"modes {args.modes}, {args.repeats} round(s), gradient checkpointing {args.gradient_checkpointing}, "
        f"memory fraction {args.memory_fraction}"
    )
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):  # glibc: fixed threshold, large blocks go back to the system
        settings += f", MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}"
    preamble = [run["header"], models_text, settings]
    print(*preamble, sep="\n", flush=True)
    rows = prefill_benchmark(
        retnet,
        llama,
        args.lengths,
        args.batch_size,
        args.modes,
        args.variants,
        args.repeats,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        memory_fraction=args.memory_fraction,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
        others=others,
        progress=lambda rows: save_partial(args.out, "prefill", preamble, rows, COLUMNS),
    )
    table = format_table(rows, COLUMNS)
    chunk = retnet_config.recurrent_chunk_size
    summary = "\n".join(f"- {line}" for line in prefill_summary(rows, chunk))
    note = (
        "forward: no_grad, use_cache=True, last-token logits (a prefill); forward+backward: labels = inputs, "
        f"full logits, loss.backward(). seconds: the median over {args.repeats} round(s), each of which timed "
        "every variant of the length and mode once, side by side; x Llama time: the variant's seconds over "
        "Llama SDPA's, the median over rounds of the ratio within a round (below 1: the variant is faster). peak MB: "
        f"{PeakMemory(args.device).method} (increase over the start) in an untimed run before the rounds; "
        "RSS MB (CPU): sampled resident-set increase in that run, which also counts memory malloc keeps after a "
        "free."
    )
    png = plot_prefill(rows, f"{args.out}/prefill.png", f"Prefill and training ({args.size}, {args.dtype})")
    publish(args.out, "prefill", preamble, [table, note, summary], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
