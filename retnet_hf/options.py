"""Command-line options built from a run's settings dataclass, so that each setting is declared once.

A field becomes `--field-name` with the field's default and type; its `metadata` may give `help`, `flag` (another
option name), `positional=True`, `choices`, `parse` (a function from the text to the value), and `cli=False` to
keep the field off the command line. `bool` fields take `--name` / `--no-name`; tuple fields take
comma-separated values.
"""

import argparse
import dataclasses
import typing
from typing import Any, Type


def add_settings_options(parser: argparse.ArgumentParser, settings: Type, **defaults: Any) -> None:
    """One option per field of the dataclass `settings` (`defaults` override the dataclass's own)."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        meta = field.metadata
        if not meta.get("cli", True):
            continue
        default = defaults.get(field.name, _default(field))
        kind = hints[field.name]
        options = dict(help=meta.get("help", ""), default=default)
        if "choices" in meta:
            options["choices"] = meta["choices"]
        base = typing.get_origin(kind) or kind
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif base is tuple:
            inner = typing.get_args(kind)[0]
            options["type"] = meta.get("parse", lambda text, inner=inner: tuple(inner(x) for x in text.split(",")))
        elif base is typing.Union:  # Optional[X]
            options["type"] = meta.get("parse", next(a for a in typing.get_args(kind) if a is not type(None)))
        else:
            options["type"] = meta.get("parse", kind)
        if meta.get("positional"):
            if (
                "default" in options
                and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                options.pop("default")
            parser.add_argument(field.name, metavar=field.name.upper(), **options)
        else:
            parser.add_argument(meta.get("flag", "--" + field.name.replace("_", "-")), dest=field.name, **options)


def settings_from_args(settings: Type, args: argparse.Namespace, **values: Any):
    """The dataclass `settings` from the parsed `args` (and `values` for fields that are not options)."""
    names = {field.name for field in dataclasses.fields(settings)}
    return settings(**{**{k: v for k, v in vars(args).items() if k in names}, **values})


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
