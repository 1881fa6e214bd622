"""`retnet-hf`: the command line for the life of a RetNet model (also `python -m retnet_hf`)."""

import argparse
import sys
from typing import List, Optional

from .errors import UsageError
from .options import add_settings_options, float_in, non_negative_int, positive_float, positive_int, settings_from_args


def _sampling_kwargs(args) -> dict:
    if args.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cmd_train(args) -> None:
    from .pretraining import PretrainSettings, pretrain

    result = pretrain(settings_from_args(PretrainSettings, args))
    if not _is_main_process() or not result.trained:
        return  # under torchrun / accelerate launch the main process reports; a finished run said so
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s: eval loss {result.eval_loss:.3f}, "
        f"perplexity {result.eval_perplexity:.1f}; model saved to {result.output_dir} (loss curve: loss.png)"
    )


def cmd_generate(args) -> None:
    from .text_generation import generate_text, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.trust_remote_code, args.quantize)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.seed, **_sampling_kwargs(args))


def cmd_chat(args) -> None:
    """Each turn feeds only the new text: the recurrent state carries the conversation, at a flat cost per token."""
    from .text_generation import chat, load_for_inference

    model, tokenizer = load_for_inference(args.model, args.trust_remote_code, args.quantize)
    chat(model, tokenizer, args.max_new_tokens, _read_line, **_sampling_kwargs(args))


def _read_line():
    """One line of stdin, as bytes where stdin has a byte buffer (a line that is not UTF-8 must not end the chat),
    else as text; None at the end of the input."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    line = stream.readline()
    return line if line else None


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(
        texts=[args.text] if args.text else None,
        output_dir=args.output,
        overwrite=args.overwrite,
        max_seconds=args.max_seconds,
        max_steps=args.max_steps,
    )


def cmd_convert(args) -> None:
    """Convert a torchscale/fairseq, syncdoth-format or fla RetNet checkpoint into a retnet-hf folder."""
    from .conversion import ConversionError, convert_checkpoint

    def notify(message: str) -> None:  # a staging folder of OUT removed or left alone
        print(f"retnet-hf convert: {message}", file=sys.stderr)

    try:
        out = convert_checkpoint(
            args.source_format,
            args.src,
            args.out,
            config_json=args.config,
            max_shard_size=args.max_shard_size,
            notify=notify,
        )
    except ConversionError as error:
        raise UsageError(str(error)) from error
    print(
        f"converted {args.source_format} checkpoint {args.src} -> {out} "
        "(load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
    )


def cmd_sft(args) -> None:
    from .finetuning import SFTSettings, sft

    settings = settings_from_args(SFTSettings, args)
    result = sft(settings)
    if not result.trained:
        return  # a finished run's rerun: it said so
    method = settings.method
    what = "merged model" if result.merged else "LoRA adapter"
    loss = f"{result.train_loss:.3f}" if result.train_loss is not None else "n/a"
    print(
        f"fine-tuned ({method}) {result.steps} steps in {result.seconds:.0f} s, last training loss {loss}; "
        f"{what} saved to {result.output_dir} (loss curve: loss.png)"
    )


def cmd_eval(args) -> None:
    """lm-eval on a model folder (its HFLM and simple_evaluate): the results JSON, and lm-eval's table."""
    from .evaluation import EvalSettings, evaluate_folder, results_table

    results = evaluate_folder(settings_from_args(EvalSettings, args))
    used = results["retnet_hf"]
    print(results_table(results))
    print(
        f"evaluated {used['folder']} ({used['dtype']}, batch {used['batch_size']}, context {used['max_length']:,} "
        f"tokens{'' if used['limit'] is None else ', limit ' + str(used['limit'])}); results: {used['output']}"
    )


def cmd_push(args) -> None:
    """Check a model folder, then upload its model-repository files to a Hub model repo (or, with --dry-run, list
    them); what is left out, and why, goes to stderr in both cases."""
    from .hub import check_target, left_out_report, plan_upload, push_plan, shown

    check_target(args.repo_id, args.revision, args.create_pr)
    plan = plan_upload(args.folder, include=args.include)
    for line in left_out_report(plan):
        print(line, file=sys.stderr)
    left_out = f"; {len(plan.left_out)} left out (listed on stderr)" if plan.left_out else ""
    if args.dry_run:
        for operation in plan.operations:
            print(
                f"{operation.upload_info.size:>14,}  {operation.upload_info.sha256.hex()[:16]}  "
                f"{shown(operation.path_in_repo)}"
            )
        print(
            f"{args.folder} is complete: {len(plan.operations)} files, {plan.size:,} bytes would go to {args.repo_id}"
            f"{left_out} (dry run: nothing was uploaded)"
        )
        return
    info = push_plan(
        plan,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
        create_pr=args.create_pr,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {len(plan.operations)} files of {args.folder} to {args.repo_id}{left_out}: {url}")


def cmd_export_onnx(args) -> None:
    """Export a model folder to ONNX (prefill and step graphs, tokenizer, config) and check it on ONNX Runtime."""
    from .onnx_runtime import GRAPHS, export_onnx

    notify = lambda message: print(message, file=sys.stderr)  # noqa: E731
    out = export_onnx(args.folder, args.out, quantize=args.quantize, notify=notify)
    sizes = ", ".join(  # a graph over 2 GB keeps its weights in files beside it (FILE.data)
        f"{file} ({sum(path.stat().st_size for path in out.glob(file + '*')) / 2**20:.1f} MiB)"
        for file in GRAPHS.values()
    )
    print(
        f"exported {args.folder} -> {out}: {sizes}, checked against PyTorch on ONNX Runtime; decode with "
        f"python -c \"from retnet_hf.onnx_runtime import generate; print(generate('{out}', 'Hello', 20))\""
    )


def build_parser() -> argparse.ArgumentParser:
    from .finetuning import SFTSettings
    from .pretraining import PretrainSettings

    parser = argparse.ArgumentParser(
        prog="retnet-hf",
        description="RetNet as a transformers model: train, generate, chat, and a demo on an embedded corpus.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="train a small RetNet for a couple of minutes and show its claims")
    demo.add_argument("--text", help="train on this text file instead of the embedded corpus (this package's source)")
    demo.add_argument("--output", default="retnet-demo", help="folder for the trained model (default retnet-demo)")
    demo.add_argument("--max-seconds", type=positive_float, default=120.0, help="training time budget (default 120)")
    demo.add_argument("--max-steps", type=positive_int, default=1500, help="training steps at most (default 1500)")
    demo.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty --output that is not an earlier run's"
    )
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="pretrain a RetNet from scratch, or continue one, on text")
    add_settings_options(train, PretrainSettings)
    train.set_defaults(func=cmd_train)

    for name, help_text in (
        ("generate", "continue a prompt, streaming tokens"),
        ("chat", "chat through stdin; the recurrent state carries the conversation"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model", help="a model folder")
        if name == "generate":
            sub.add_argument("--prompt", default="", help="text to continue")
        sub.add_argument("--max-new-tokens", type=positive_int, default=200 if name == "generate" else 128)
        sub.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
        sub.add_argument("--temperature", type=positive_float, default=0.8)
        sub.add_argument("--top-p", type=float_in(0.0, 1.0), default=0.9, help="nucleus mass in (0, 1]")
        sub.add_argument("--top-k", type=positive_int, default=50)
        sub.add_argument("--seed", type=non_negative_int, default=None)
        sub.add_argument(
            "--quantize",
            choices=("int8", "int4"),
            help="run a RetNet with quantized weights on ONNX Runtime (exported once into HF_HOME/retnet-hf/onnx, "
            "reused after): the fastest way on a CPU; the state stays float32",
        )
        sub.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="let a folder that is not a RetNet run its own Python code (RetNet folders never need it)",
        )
        sub.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    sft = commands.add_parser("sft", help="fine-tune a model folder on guanaco-style chat data (LoRA, QLoRA, full)")
    add_settings_options(sft, SFTSettings)
    sft.set_defaults(func=cmd_sft)

    from .evaluation import EvalSettings

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model folder with lm-eval (local tasks from the package's sample data, or lm-eval's own)",
    )
    add_settings_options(evaluate, EvalSettings)
    evaluate.set_defaults(func=cmd_eval)

    convert = commands.add_parser("convert", help="convert a torchscale, syncdoth or fla RetNet checkpoint")
    convert.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=["torchscale", "syncdoth", "fla"],
        help="the source's format",
    )
    convert.add_argument("src", help="a checkpoint file or folder, or a Hub id")
    convert.add_argument("out", help="the folder to write (must not exist)")
    convert.add_argument(
        "--config",
        help="a JSON file of source config fields (needed for a bare torchscale "
        "state dict; overrides what the source holds)",
    )
    convert.add_argument("--max-shard-size", default="2GB", help="largest output weight file (default 2GB)")
    convert.set_defaults(func=cmd_convert)

    push = commands.add_parser("push", help="check a model folder and upload it to the Hugging Face Hub")
    push.add_argument("folder", help="a model folder (weights, config, code, tokenizer, generation config, card)")
    push.add_argument("repo_id", help="the Hub model repo, e.g. your-name/retnet-tiny (created if it does not exist)")
    push.add_argument("--private", action="store_true", help="create the repo private (no effect if it exists)")
    push.add_argument("--revision", help="the branch to commit to (created from main if needed; default main)")
    push.add_argument("--commit-message", help="the commit's title")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or the saved login)")
    push.add_argument(
        "--dry-run",
        action="store_true",
        help="check the folder and list the files, sizes and sha256 that would be uploaded",
    )
    push.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload these files (a path, a folder or a pattern such as 'notes/*.md'; repeatable); a "
        "secret-looking file goes only when PATTERN is its exact path",
    )
    push.set_defaults(func=cmd_push)

    export_onnx = commands.add_parser(
        "export-onnx", help="export a model folder to ONNX: prefill and decode-step graphs for ONNX Runtime"
    )
    export_onnx.add_argument("folder", help="a RetNet model folder")
    export_onnx.add_argument("out", help="the folder to write (must not exist)")
    export_onnx.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="quantize the graphs' weights with ONNX Runtime's own quantizers (int8: per channel, activations at "
        "run time; int4: blocks of 32); the state stays float32, the check allows the measured quantization error",
    )
    export_onnx.set_defaults(func=cmd_export_onnx)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as error:
        print(f"retnet-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retnet-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
