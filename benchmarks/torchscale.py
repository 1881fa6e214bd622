"""retnet_hf against Microsoft's torchscale 0.3.0 on the same weights: the prompt (ours in one chunkwise pass,
torchscale token by token, the only way its incremental decoding takes one) and the decode step after it.

Needs `pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`. The logic is
`retnet_hf.benchmarking.torchscale_benchmark`; this script prints the machine, the model, a markdown table and
saves torchscale.png, torchscale.md and torchscale.json into --out. `max rel diff` checks that both computed the
same logits.

Full run (defaults: 125M, prompts 512 1k 2k 4k, batch 1, 16 decode steps): estimated 3-6 minutes on an idle
2-core CPU (almost all of it torchscale's 7,680 token-by-token calls, about 20-40 ms each).
Quick run (tiny model, seconds): python -m benchmarks.torchscale --quick
"""

import argparse
import statistics
import sys
from typing import Callable, List, Sequence

import torch
from torch import nn

from retnet_hf.conversion import to_torchscale_key
from retnet_hf.model import CACHE_NAME, RetNetForCausalLM

from .common import (
    add_common_arguments,
    build_models,
    describe_models,
    format_table,
    import_torchscale,
    log_axes,
    next_token,
    parse_ints,
    prepare_run,
    publish,
    pyplot,
    relative_difference,
    save_figure,
    size_config,
    timed,
)


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
    state = {to_torchscale_key(key): value for key, value in model.state_dict().items()}
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
            differences = [relative_difference(ours_logits, results["theirs"])]
            sequence, token = prompt, next_token(results["ours"].logits)
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
                differences.append(relative_difference(results["ours"], results["theirs"]))
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


def plot_torchscale(rows: List[dict], path: str, title: str = "") -> str:
    """Prompt time and decode step time against the prompt length, ours vs torchscale; saved as PNG."""
    plt = pyplot()
    figure, (prompt, step) = plt.subplots(1, 2, figsize=(12, 5))
    x = [row["prompt"] for row in rows]
    prompt.plot(x, [row["ours prefill s"] for row in rows], "-o", label="retnet_hf, one pass (chunkwise)")
    prompt.plot(x, [row["torchscale prompt s"] for row in rows], "-o", label="torchscale 0.3.0, token by token")
    step.plot(x, [row["ours ms/step"] for row in rows], "-o", label="retnet_hf")
    step.plot(x, [row["torchscale ms/step"] for row in rows], "-o", label="torchscale 0.3.0")
    for axis, label in ((prompt, "prompt time (s)"), (step, "decode step after the prompt (ms)")):
        log_axes(axis, "prompt length (tokens)", label, fontsize=8)
    return save_figure(plt, figure, title or "retnet_hf vs torchscale 0.3.0, same weights", path)


COLUMNS = [
    "prompt",
    "batch",
    "ours prefill s",
    "torchscale prompt s",
    "prefill speed-up",
    "ours ms/step",
    "torchscale ms/step",
    "max rel diff",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--prompts", type=parse_ints, default=None, help="prompt lengths, default '512,1k,2k,4k'")
    parser.add_argument("--batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--decode-steps", type=int, default=None, help="decode steps after the prompt; default 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.size = "tiny"
        args.bandwidth_mb = min(args.bandwidth_mb, 64)
    args.prompts = args.prompts or ([16, 64] if args.quick else [512, 1024, 2048, 4096])
    args.decode_steps = args.decode_steps or (4 if args.quick else 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import_torchscale()
    except ImportError as error:
        print(
            f"torchscale is not importable ({error}); pip install --no-deps torchscale==0.3.0 fairscale==0.4.0",
            file=sys.stderr,
        )
        return 2
    run = prepare_run(args)
    retnet, _ = build_models(size_config(args.size), dtype=run["dtype"], device=args.device, seed=args.seed)
    settings = (
        f"settings: size {args.size}, {args.dtype}, prompts {args.prompts}, batch {args.batch_size}, "
        f"{args.decode_steps} decode steps"
    )
    print(run["header"], describe_models(retnet), settings, sep="\n", flush=True)
    rows = torchscale_benchmark(
        retnet,
        args.prompts,
        args.decode_steps,
        args.batch_size,
        seed=args.seed,
        log=lambda message: print(f"  ... {message}", file=sys.stderr, flush=True),
    )
    table = format_table(rows, COLUMNS)
    note = (
        "ours prefill: one forward pass (chunkwise) returning the state; torchscale prompt: its incremental "
        "decoding, one call per token; ms/step: median decode step after the prompt; max rel diff: logits of "
        "both, relative to their largest magnitude."
    )
    preamble = [run["header"], describe_models(retnet), settings]
    png = plot_torchscale(
        rows, f"{args.out}/torchscale.png", f"retnet_hf vs torchscale 0.3.0, same weights ({args.size}, {args.dtype})"
    )
    publish(args.out, "torchscale", preamble, [table, note], rows, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
