"""`retnet-hf`: the command line for the life of a RetNet model (also `python -m retnet_hf`).

Each command is declared once, in the module that runs it: a settings dataclass, whose fields make the command's
options (`options.add_settings_options`), and a function that runs the command from those settings. This file is
the table of them (`COMMANDS`, also written down in docs/design.md, "Commands") and the loop that makes the parser.
"""

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import List, Optional

from .errors import UsageError
from .options import add_settings_options, settings_from_args


@dataclass(frozen=True)
class Command:
    """A command: its name and help line, and where it is declared: the `settings` dataclass and the `run` function
    (`run(settings)`) of the module `retnet_hf.<module>`, imported only when the parser is built."""

    name: str
    module: str
    settings: str
    run: str
    help: str

    def load(self, attribute: str):
        """`settings` or `run` (the attribute's name) from the command's module."""
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), attribute)


COMMANDS = (  # name, module, settings dataclass, run function; the help line
    Command("demo",        "demo",            "DemoSettings",       "demo_command",
            "train a small RetNet for a couple of minutes and show its claims"),
    Command("train",       "pretraining",     "PretrainSettings",   "train_command",
            "pretrain a RetNet from scratch, or continue one, on text"),
    Command("generate",    "text_generation", "GenerateSettings",   "generate_command",
            "continue a prompt, streaming tokens"),
    Command("chat",        "text_generation", "ChatSettings",       "chat_command",
            "chat through stdin; the recurrent state carries the conversation"),
    Command("sft",         "finetuning",      "SFTSettings",        "sft_command",
            "fine-tune a model folder on guanaco-style chat data (LoRA, QLoRA, full)"),
    Command("eval",        "evaluation",      "EvalSettings",       "eval_command",
            "evaluate a model folder with lm-eval (local tasks from the package's sample data, or lm-eval's own)"),
    Command("convert",     "conversion",      "ConvertSettings",    "convert_command",
            "convert a torchscale, syncdoth or fla RetNet checkpoint"),
    Command("push",        "hub",             "PushSettings",       "push_command",
            "check a model folder and upload it to the Hugging Face Hub"),
    Command("export-onnx", "onnx_runtime",    "ExportOnnxSettings", "export_onnx_command",
            "export a model folder to ONNX: prefill and decode-step graphs for ONNX Runtime"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retnet-hf",
        description="RetNet as a transformers model: train, generate, chat, and a demo on an embedded corpus.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        add_settings_options(commands.add_parser(command.name, help=command.help), command.load(command.settings))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = next(command for command in COMMANDS if command.name == args.command)
    try:
        settings = settings_from_args(command.load(command.settings), args)  # a settings class checks itself here
        command.load(command.run)(settings)
    except UsageError as error:
        print(f"retnet-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"retnet-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
