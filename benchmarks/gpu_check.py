"""RetNet's correctness on a CUDA device: the checks of `scripts/gpu_check.sh` (its step 2), which the CPU-oriented
tests cannot make. Each check is a row: what was compared, the dtype, the measured value, its tolerance, ok/FAIL.

- forms: the chunkwise and recurrent forms' logits against the parallel form's (float32, retention_backend="torch");
- cache: one prefill with `use_cache`, then one token per call, against a forward without a cache (float32);
- bfloat16: a forward and a training step (`loss.backward()`) give finite logits, loss and gradients;
- fla against torch (`retention_backend` "fla", flash-linear-attention's Triton kernels, against "torch", the same
  weights): the whole model's logits in float32 (max |difference| / max |logit|) and in bfloat16 (the ratio of
  root-mean-square error to root-mean-square logit, as fla's own tests measure), the cache check through fla's
  kernels (chunk_simple_gla for the prompt, fused_recurrent_simple_gla for the steps), generate()'s greedy tokens
  (float32) and every parameter's gradient (float32);
- fla's kernels ran: the CUDA kernels that torch.profiler sees in a prompt forward and a one-token step under "fla"
  include fla's (chunk_fwd_kernel*, fused_recurrent_fwd_kernel), and under "torch" none of them.

fla's float32 products would run in TF32 (Triton's default for float32 `tl.dot`, about 1e-3 relative): `check` sets
TRITON_F32_DEFAULT=ieee (and a Triton cache folder of its own) before any kernel compiles, unless the variable is set,
so that float32 is compared at float32's precision; the header says which was used.

    python -m benchmarks.gpu_check env --out DIR                 versions and the GPU (DIR/env.md)
    python -m benchmarks.gpu_check check --device cuda --out DIR  the checks (DIR/gpu_check.md, .json); exit 1 on a FAIL
    python -m benchmarks.gpu_check check --quick                  tiny model on the CPU: the fla rows say why they did not run
"""

import argparse
import copy
import functools
import importlib.metadata
import math
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from retnet_hf.model import CACHE_NAME, RetNetForCausalLM

from .common import (
    error_summary,
    fla_backend_unavailable,
    format_table,
    parameter_count,
    publish,
    relative_difference,
    retention_backend,
    size_config,
    write_results,
)


# max |difference| / max |reference| in float32 (forms, cache, fla vs torch logits) and for gradients; the bfloat16
# logits' root-mean-square error over the reference's root-mean-square (fla's tests' measure and order)
FP32_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
BF16_RMS_TOLERANCE = 2e-2
FLA_KERNELS = {"prompt": ("chunk_fwd_kernel",), "step": ("fused_recurrent_fwd_kernel",)}
COLUMNS = ["check", "dtype", "value", "tolerance", "status", "note"]
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "flash-linear-attention",
    "fla-core",
    "flash-attn",
    "vllm",
    "accelerate",
    "einops",
    "numpy",
    "retnet-hf",
)


def rms_ratio(x: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(mean((x - reference)^2)) / sqrt(mean(reference^2))."""
    x, reference = x.double(), reference.double()
    return ((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


def make_row(check: str, dtype: str, value, tolerance, passed: bool, note: str = "") -> dict:
    return {
        "check": check,
        "dtype": dtype,
        "value": value,
        "tolerance": tolerance,
        "status": "ok" if passed else "FAIL",
        "note": note,
        "skipped": None,
    }


def skipped_row(check: str, dtype: str, reason: str) -> dict:
    return {"check": check, "dtype": dtype, "status": "skipped", "note": reason, "skipped": None}


def dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


@torch.no_grad()
def logits_of(model, ids, backend: Optional[str] = None, **kwargs) -> torch.Tensor:
    with retention_backend(model, backend):
        return model(ids, **kwargs).logits.float()


def check_forms(model, ids) -> List[dict]:
    """The chunkwise and recurrent forms' logits against the parallel form's (retention_backend="torch")."""
    reference = logits_of(model, ids, "torch", retention_form="parallel")
    rows = []
    for form in ("chunkwise", "recurrent"):
        value = relative_difference(logits_of(model, ids, "torch", retention_form=form), reference)
        rows.append(
            make_row(
                f"forms: {form} vs parallel logits", dtype_name(model), value, FP32_TOLERANCE, value <= FP32_TOLERANCE
            )
        )
    return rows


@torch.no_grad()
def step_logits(model, ids, prefix: int, backend: str) -> torch.Tensor:
    """Logits of tokens `prefix..T-1`: a prefill of `ids[:, :prefix]` with `use_cache`, then one token per call."""
    with retention_backend(model, backend):
        out = model(ids[:, :prefix], use_cache=True)
        cache, steps = getattr(out, CACHE_NAME), [out.logits[:, -1:].float()]
        for t in range(prefix, ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            steps.append(out.logits.float())
    return torch.cat(steps, dim=1)


def check_cache(model, ids, prefix: int, backend: str, reference: Optional[torch.Tensor] = None) -> dict:
    """Per-step logits through the cache (under `backend`) against one forward without a cache (torch)."""
    if reference is None:
        reference = logits_of(model, ids, "torch")
    value = relative_difference(step_logits(model, ids, prefix, backend), reference[:, prefix - 1 : -1])
    steps = ids.shape[1] - prefix
    name = f"cache ({backend}): prefill {prefix} + {steps} steps vs no cache (torch)"
    return make_row(name, dtype_name(model), value, FP32_TOLERANCE, value <= FP32_TOLERANCE)


def gradients_of(model, ids, backend: str):
    """A training step's loss (a float) and every parameter's gradient (float32 copies, by name), under `backend`."""
    with retention_backend(model, backend):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        gradients = {
            name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None
        }
        model.zero_grad(set_to_none=True)
    return loss.item(), gradients


def check_finite(model, ids, backend: str) -> dict:
    """A forward (logits) and a training step (loss, every gradient) give no inf or NaN."""
    logits = logits_of(model, ids, backend)
    loss, gradients = gradients_of(model, ids, backend)
    bad = [
        name
        for name, finite in (
            ("logits", torch.isfinite(logits).all().item()),
            ("loss", math.isfinite(loss)),
            ("gradients", all(torch.isfinite(g).all().item() for g in gradients.values())),
        )
        if not finite
    ]
    note = f"loss {loss:.4f}, {len(gradients)} gradients" + (f"; not finite: {', '.join(bad)}" if bad else "")
    return make_row(f"finite ({backend}): forward and training step", dtype_name(model), len(bad), 0, not bad, note)


def backend_checks(
    model, half, ids, prefix: int, prompt: int, new_tokens: int, backends=("torch", "fla")
) -> List[Tuple[str, Callable[[], List[dict]]]]:
    """The checks of the second backend (fla) against the first (torch) on the same weights, each a (name, function
    giving its rows): float32 logits, the cache check, greedy generate() tokens and gradients on `model`; bfloat16
    logits and finiteness on `half`."""
    reference, other = backends
    label = f"{other} vs {reference}"
    dtype = dtype_name(model)

    @functools.lru_cache(maxsize=None)
    def logits(backend, half_precision=False):
        return logits_of(half if half_precision else model, ids, backend)

    def float32_logits():
        value = relative_difference(logits(other), logits(reference))
        return [make_row(f"{label}: logits", dtype, value, FP32_TOLERANCE, value <= FP32_TOLERANCE)]

    def half_logits():
        value = rms_ratio(logits(other, True), logits(reference, True))
        note = ", ".join(
            f"{backend} vs {reference} float32: {rms_ratio(logits(backend, True), logits(reference)):.2e}"
            for backend in backends
        )
        passed = value <= BF16_RMS_TOLERANCE
        return [
            make_row(f"{label}: logits (rms error ratio)", dtype_name(half), value, BF16_RMS_TOLERANCE, passed, note)
        ]

    def generated():
        tokens = {}
        for backend in backends:
            with retention_backend(model, backend):
                tokens[backend] = model.generate(
                    ids[:, :prompt],
                    attention_mask=torch.ones_like(ids[:, :prompt]),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                )[:, prompt:]
        differ = tokens[other] != tokens[reference]
        note = f"{differ.numel()} tokens"
        if differ.any():
            note += f"; the first difference at new token {differ.any(dim=0).nonzero()[0].item()}"
        count = differ.sum().item()
        return [make_row(f"{label}: generate() greedy tokens", dtype, count, 0, count == 0, note)]

    def gradients():
        losses, found = {}, {}
        for backend in backends:
            losses[backend], found[backend] = gradients_of(model, ids, backend)
        worst, worst_name = 0.0, ""
        for name, grad in found[reference].items():
            if grad.abs().max() > 0 and name in found[other]:
                value = relative_difference(found[other][name], grad)
                if value > worst:
                    worst, worst_name = value, name
        missing = sorted(set(found[reference]) ^ set(found[other]))
        note = f"worst: {worst_name}; loss {losses[reference]:.6f} vs {losses[other]:.6f}"
        if missing:
            note += f"; gradients of only one backend: {missing[:3]}"
        passed = worst <= GRADIENT_TOLERANCE and not missing
        return [make_row(f"{label}: gradients (worst parameter)", dtype, worst, GRADIENT_TOLERANCE, passed, note)]

    return [
        (f"{label}: logits", float32_logits),
        (f"cache ({other})", lambda: [check_cache(model, ids, prefix, other, logits(reference))]),
        (f"{label}: logits bfloat16", half_logits),
        (f"finite ({other})", lambda: [check_finite(half, ids, other)]),
        (f"{label}: generate()", generated),
        (f"{label}: gradients", gradients),
    ]


def cuda_kernel_names(fn: Callable[[], object]) -> List[str]:
    """Names of the CUDA kernels that `fn` launches (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        fn()
        torch.cuda.synchronize()
    return sorted({event.name for event in profiler.events() if event.device_type == DeviceType.CUDA})


def check_kernels(model, ids, backends=("torch", "fla")) -> List[dict]:
    """fla's kernels run under "fla" and not under "torch": a prompt forward and a one-token step."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, CACHE_NAME)
    calls = {
        "prompt": lambda: model(ids, use_cache=True),
        "step": lambda: model(ids[:, -1:], **{CACHE_NAME: copy.deepcopy(cache)}, use_cache=True),
    }
    rows = []
    for what, call in calls.items():
        seen = {}
        for backend in backends:
            with retention_backend(model, backend), torch.no_grad():
                call()  # compiled and tuned outside the profile
                names = cuda_kernel_names(call)
            seen[backend] = [name for name in names if any(pattern in name for pattern in FLA_KERNELS[what])]
        reference, other = backends
        passed = bool(seen[other]) and not seen[reference]
        note = f"{other}: {', '.join(seen[other]) or 'none'}; {reference}: {', '.join(seen[reference]) or 'none'}"
        rows.append(
            make_row(
                f"kernels: {what} launches fla's ({FLA_KERNELS[what][0]}*)",
                dtype_name(model),
                len(seen[other]),
                ">= 1",
                passed,
                note,
            )
        )
    return rows


def run_checks(
    model: RetNetForCausalLM,
    ids: torch.Tensor,
    prefix: int,
    prompt: int,
    new_tokens: int,
    backends: Sequence[str] = ("torch", "fla"),
    log: Callable[[str], None] = lambda message: None,
) -> List[dict]:
    """Every check on `model` (float32) and a bfloat16 copy of it, `ids` `[B, T]` on its device; the comparison of
    `backends[1]` with `backends[0]` where `fla_backend_unavailable` allows (else those rows say why). A check
    that raises is a FAIL row naming the error, and the others go on."""
    device = ids.device
    half = copy.deepcopy(model).to(torch.bfloat16)
    other = backends[1]
    unavailable = fla_backend_unavailable(device, torch.float32) if other == "fla" else None
    groups = [
        ("forms", lambda: check_forms(model, ids)),
        ("cache (torch)", lambda: [check_cache(model, ids, prefix, "torch")]),
        ("finite (torch)", lambda: [check_finite(half, ids, "torch")]),
    ]
    if unavailable:
        rows_unavailable = [skipped_row(f"{other} vs {backends[0]}", "float32, bfloat16", unavailable)]
    else:
        rows_unavailable = []
        groups += backend_checks(model, half, ids, prefix, prompt, new_tokens, backends)
        if device.type == "cuda" and other == "fla":
            groups.append(("kernels", lambda: check_kernels(model, ids, backends)))
        elif other == "fla":
            rows_unavailable.append(skipped_row("kernels", "float32", "the profiler's CUDA kernels need a CUDA device"))
    rows = []
    for name, group in groups:
        log(f"gpu_check: {name}")
        try:
            rows += group()
        except Exception as error:  # one broken check must not hide the others
            rows.append({**skipped_row(name, "", ""), "status": "FAIL", "note": f"raised {error_summary(error)}"})
    return rows + rows_unavailable


def versions() -> Dict[str, str]:
    """Installed versions of `PACKAGES` ("-" where not installed), python and the platform."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def environment_lines(found: Dict[str, str]) -> List[str]:
    """The versions `found` (`versions()`), torch's CUDA build, the GPU, whether fla imports, and Triton's precision
    setting."""
    lines = [f"- {name}: {version}" for name, version in found.items()]
    lines.append(f"- torch CUDA build: {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"- GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 1024**3:.1f} GiB, {props.multi_processor_count} SMs"
            )
    else:
        lines.append("- CUDA: not available to torch")
    if torch.cuda.is_available():  # (importing fla takes seconds, and without CUDA it would only fall back)
        try:
            import fla  # noqa: F401

            lines.append("- fla: imports")
        except Exception as error:
            lines.append(f"- fla: does not import ({error_summary(error)})")
    lines.append(f"- fla retention backend on cuda: {fla_backend_unavailable('cuda') or 'available'}")
    lines.append(f"- TRITON_F32_DEFAULT: {os.environ.get('TRITON_F32_DEFAULT', 'unset (tf32)')}")
    return lines


def ieee_float32_dots() -> str:
    """Make Triton's float32 `tl.dot` IEEE (not TF32) for kernels compiled from now on, in a cache folder of their
    own, unless TRITON_F32_DEFAULT is already set; returns the setting in force."""
    if "TRITON_F32_DEFAULT" not in os.environ:
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
        cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
        os.environ["TRITON_CACHE_DIR"] = cache.rstrip("/") + "-f32-ieee"
    return os.environ["TRITON_F32_DEFAULT"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions and the GPU, into --out/env.md")
    env.add_argument("--out", default="bench-results")
    check = commands.add_parser("check", help="the checks, into --out/gpu_check.md and .json")
    check.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    check.add_argument(
        "--size", default=None, help="model size (benchmarks.common.SIZES); default 125m, tiny with --quick"
    )
    check.add_argument("--length", type=int, default=None, help="tokens per row; default 1000 (40 with --quick)")
    check.add_argument("--batch-size", type=int, default=2)
    check.add_argument("--steps", type=int, default=None, help="one-token steps of the cache check; default 16 (8)")
    check.add_argument("--new-tokens", type=int, default=None, help="generate()'s new tokens; default 32 (8)")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--out", default="bench-results")
    check.add_argument("--quick", action="store_true", help="tiny model and inputs (a smoke test, seconds on a CPU)")
    args = parser.parse_args(argv)
    if args.command == "check":
        args.size = args.size or ("tiny" if args.quick else "125m")
        args.length = args.length or (40 if args.quick else 1000)
        args.steps = args.steps or (8 if args.quick else 16)
        args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "env":
        found = versions()
        lines = environment_lines(found)
        print("\n".join(["# Environment", "", *lines]) + "\n")
        write_results(args.out, "env", ["# Environment"], ["\n".join(lines)], found)
        return 0
    precision = ieee_float32_dots()
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(args.seed)
    config = size_config(args.size)
    model = RetNetForCausalLM(config).to(args.device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, config.vocab_size, (args.batch_size, args.length), generator=generator).to(args.device)
    prefix = args.length - args.steps
    header = [
        "# RetNet on " + (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device),
        f"torch {torch.__version__}, {', '.join(f'{k} {v}' for k, v in versions().items() if k in ('transformers', 'triton', 'flash-linear-attention'))}",
        f"model: size {args.size}, {parameter_count(model):,} parameters, chunk {config.recurrent_chunk_size}; input "
        f"[{args.batch_size}, {args.length}] random tokens; cache check: prefill {prefix} + {args.steps} steps; "
        f"generate: prompt {args.length // 2}, {args.new_tokens} new tokens; Triton float32 dots: {precision}",
    ]
    print(*header, sep="\n", flush=True)
    rows = run_checks(
        model,
        ids,
        prefix,
        args.length // 2,
        args.new_tokens,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = format_table(rows, COLUMNS)
    failed = [row["check"] for row in rows if row["status"] == "FAIL"]
    note = (
        "value: max |difference| / max |reference| (float32 logits and gradients), root-mean-square error over the "
        "reference's root-mean-square (bfloat16 logits), a count (tokens that differ, non-finite results, fla "
        f"kernels seen). Tolerances: {FP32_TOLERANCE:g} (float32), {GRADIENT_TOLERANCE:g} (gradients), "
        f"{BF16_RMS_TOLERANCE:g} (bfloat16 rms)."
    )
    verdict = f"{len(rows)} checks: " + (f"FAILED: {', '.join(failed)}" if failed else "all ok or skipped")
    publish(args.out, "gpu_check", header, [table, note, verdict], rows, None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
