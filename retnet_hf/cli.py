"""`retnet-hf`: the command line for the life of a RetNet model (also `python -m retnet_hf`)."""

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from .errors import UsageError
from .options import add_settings_options, positive_int, settings_from_args


def _load_for_inference(folder: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UsageError(f"{folder}: not a model folder (no config.json); train one with `retnet-hf train` first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except Exception as error:  # whatever the loaders raise (bad JSON, truncated safetensors, ...)
        raise UsageError(f"{folder}: cannot load the model or its tokenizer: {error}") from error
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def _sampling_kwargs(args) -> dict:
    if args.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


class _RateStreamer:
    """A TextStreamer that also counts the generated tokens, for tokens/s."""

    def __init__(self, tokenizer):
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tokens = 0
        self.first = True

    def put(self, value):
        if not self.first:
            self.tokens += value.numel()
        self.first = False
        self.inner.put(value)

    def end(self):
        self.inner.end()


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cmd_train(args) -> None:
    from .pretraining import PretrainSettings, pretrain

    result = pretrain(settings_from_args(PretrainSettings, args))
    if not _is_main_process():
        return  # under torchrun / accelerate launch the main process reports
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s: eval loss {result.eval_loss:.3f}, "
        f"perplexity {result.eval_perplexity:.1f}; model saved to {result.output_dir} (loss curve: loss.png)"
    )


def cmd_generate(args) -> None:
    import torch

    model, tokenizer = _load_for_inference(args.model)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    streamer = _RateStreamer(tokenizer)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **_sampling_kwargs(args),
    )
    seconds = time.perf_counter() - start
    print(f"[{streamer.tokens} tokens in {seconds:.2f} s, {streamer.tokens / seconds:.1f} tokens/s]", file=sys.stderr)


def cmd_chat(args) -> None:
    """Each turn feeds only the new text: the recurrent state carries the conversation, at a flat cost per token."""
    import torch

    from .data import GUANACO_CHAT_TEMPLATE, HUMAN
    from .model import CACHE_NAME

    model, tokenizer = _load_for_inference(args.model)
    history = torch.empty(1, 0, dtype=torch.long, device=model.device)
    cache = None
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        prompt = tokenizer.apply_chat_template(  # the folder's own template, else the guanaco one sft saves
            [{"role": "user", "content": message}],
            chat_template=tokenizer.chat_template or GUANACO_CHAT_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
        turn = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        history = torch.cat([history, turn.input_ids.to(model.device)], dim=1)
        streamer = _RateStreamer(tokenizer)
        print("assistant> ", end="", flush=True)
        start = time.perf_counter()
        out = model.generate(
            history,
            attention_mask=torch.ones_like(history),
            **{CACHE_NAME: cache},
            max_new_tokens=args.max_new_tokens,
            streamer=streamer,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=[HUMAN],
            tokenizer=tokenizer,
            **_sampling_kwargs(args),
        )
        seconds = time.perf_counter() - start
        history, cache = out.sequences, getattr(out, CACHE_NAME)
        print(
            f"[{streamer.tokens / max(seconds, 1e-9):.1f} tokens/s, {history.shape[1]} tokens of context]",
            file=sys.stderr,
        )


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(
        texts=[args.text] if args.text else None,
        output_dir=args.output,
        max_seconds=args.max_seconds,
        max_steps=args.max_steps,
    )


def cmd_convert(args) -> None:
    """Convert a torchscale/fairseq, syncdoth-format or fla RetNet checkpoint into a retnet-hf folder."""
    from .conversion import ConversionError, convert_checkpoint

    try:
        out = convert_checkpoint(
            args.source_format, args.src, args.out, config_json=args.config, max_shard_size=args.max_shard_size
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
    method = settings.method
    what = "merged model" if result.merged else "LoRA adapter"
    loss = f"{result.train_loss:.3f}" if result.train_loss is not None else "n/a"
    print(
        f"fine-tuned ({method}) {result.steps} steps in {result.seconds:.0f} s, last training loss {loss}; "
        f"{what} saved to {result.output_dir} (loss curve: loss.png)"
    )


def cmd_push(args) -> None:
    """Check a model folder, then upload it to a Hub model repo (or, with --dry-run, list what would go)."""
    from .hub import plan_upload, push_folder

    if args.dry_run:
        operations = plan_upload(args.folder)
        for operation in operations:
            print(
                f"{operation.upload_info.size:>14,}  {operation.upload_info.sha256.hex()[:16]}  "
                f"{operation.path_in_repo}"
            )
        total = sum(operation.upload_info.size for operation in operations)
        print(
            f"{args.folder} is complete: {len(operations)} files, {total:,} bytes would go to {args.repo_id} "
            "(dry run: nothing was uploaded)"
        )
        return
    info = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
        create_pr=args.create_pr,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info
    print(f"pushed {args.folder} to {args.repo_id}: {url}")


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
    demo.add_argument("--max-seconds", type=float, default=120.0, help="training time budget (default 120)")
    demo.add_argument("--max-steps", type=positive_int, default=1500, help="training steps at most (default 1500)")
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
        sub.add_argument("--temperature", type=float, default=0.8)
        sub.add_argument("--top-p", type=float, default=0.9)
        sub.add_argument("--top-k", type=int, default=50)
        sub.add_argument("--seed", type=int, default=None)
        sub.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    sft = commands.add_parser("sft", help="fine-tune a model folder on guanaco-style chat data (LoRA, QLoRA, full)")
    add_settings_options(sft, SFTSettings)
    sft.set_defaults(func=cmd_sft)

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
    push.set_defaults(func=cmd_push)
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
