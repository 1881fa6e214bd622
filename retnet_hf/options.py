"""Command-line options built from a run's settings dataclass, so that each setting is declared once.

A field becomes `--field-name` with the field's default and type. Its `metadata` may give:
- `help`; `flag`: another option name (`--lr` for `learning_rate`); `positional=True`; `required=True`;
- `parse`: a function from the text to the value (a tuple field without one takes several texts, `nargs="+"`);
- `choices`; `choice_flags=True`: one flag per choice instead (`--lora` / `--qlora` / `--full` for `method`);
- `group`: fields of the same group name exclude each other on the command line;
- `cli=False`: not on the command line;
- `metavar`: the value's name in the help (default: the option's name in capitals; None: argparse's, which
  lists the choices);
- `repeat=True`: a tuple field's option given once per value (`--include A --include B`);
- `negatable=False`: a `bool` field is a plain `--name` switch, off by default.
`bool` fields otherwise take `--name` / `--no-name`.
"""

import argparse
import dataclasses
import math
import typing
from typing import Any, Type


def int_at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= `minimum` (`why` says the reason in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}{why}, got {text}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float = float("inf")):
    """An argparse type: a finite number in the range (`low`, `high`]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low < value <= high and math.isfinite(value)):
            closing = ")" if high == float("inf") else "]"
            raise argparse.ArgumentTypeError(f"must be a number in ({low:g}, {high:g}{closing}, got {text}")
        return value

    parse.__name__ = "float_in"
    return parse


positive_float = float_in(0.0)


def add_settings_options(parser: argparse.ArgumentParser, settings: Type, **defaults: Any) -> None:
    """One option per field of the dataclass `settings` (`defaults` override the dataclass's own)."""
    hints = typing.get_type_hints(settings)
    groups = {}
    for field in dataclasses.fields(settings):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        default = defaults.get(field.name, _default(field))
        if meta.get("choice_flags"):
            group = parser.add_mutually_exclusive_group()
            for choice, text in meta["choices"].items():
                group.add_argument(f"--{choice}", dest=field.name, action="store_const", const=choice, help=text)
            parser.set_defaults(**{field.name: default})
            continue
        options = dict(help=meta.get("help", ""), **_kind(hints[field.name], meta))
        if "choices" in meta:
            options["choices"] = list(meta["choices"])
        if meta.get("positional"):
            target.add_argument(field.name, metavar=meta.get("metavar", field.name.upper()), **options)
        else:
            flag = meta.get("flag", "--" + field.name.replace("_", "-"))
            if "type" in options:
                options["metavar"] = meta.get("metavar", flag.lstrip("-").replace("-", "_").upper())
            if meta.get("required"):
                options["required"] = True
            else:  # argparse appends to a list default (a copy of it)
                options["default"] = list(default) if options.get("action") == "append" else default
            target.add_argument(flag, dest=field.name, **options)


def settings_from_args(settings: Type, args: argparse.Namespace, **values: Any):
    """The dataclass `settings` from the parsed `args` (and `values`, which win)."""
    names = {field.name for field in dataclasses.fields(settings)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}
    return settings(**{**given, **values})


def _kind(kind, meta) -> dict:
    """argparse's `type` / `action` / `nargs` for a field of type `kind`."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"}
    base, args = typing.get_origin(kind), typing.get_args(kind)
    if base is tuple and meta.get("repeat"):  # one value per use of the option
        return {"type": meta.get("parse", args[0]), "action": "append"}
    if base is tuple:  # several values, or one text that `parse` makes a tuple of
        return {"type": meta["parse"]} if "parse" in meta else {"type": args[0], "nargs": "+"}
    if base is typing.Union:  # Optional[X]
        kind = next(arg for arg in args if arg is not type(None))
    return {"type": meta.get("parse", kind)}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
