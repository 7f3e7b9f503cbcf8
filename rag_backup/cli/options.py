"""Command-line options made from the restore jobs' own ``Config`` classes, so the command
line and the launchpad offer the same fields, defaults and help, and build the same config
object: ``--field-name`` per field; a bool as ``--flag/--no-flag``; a list repeated or
comma-separated; a dict as ``KEY=VALUE`` pairs."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any

import click

METAVARS = {str: "TEXT", int: "INT", float: "NUMBER"}


def _kind(annotation: Any) -> tuple[str, Any]:
    """(``bool`` | ``list`` | ``dict`` | ``scalar``, the scalar or item type)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        return "bool", bool
    if origin is list:
        return "list", args[0] if args else str
    if origin is dict:
        return "dict", args[1] if len(args) > 1 else str
    if annotation in (int, float, str):
        return "scalar", annotation
    raise TypeError(f"no command-line option for a field of type {annotation!r}")


def _split(values: Sequence[str]) -> list[str]:
    return [piece.strip() for value in values for piece in value.split(",") if piece.strip()]


def _typed(value: str, kind: type, option: str) -> Any:
    try:
        return kind(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a valid {kind.__name__}",
                                 param_hint=option) from exc


def config_options(config_cls: type, names: Mapping[str, Sequence[str]] | None = None,
                   required: Sequence[str] = ()) -> list[click.Option]:
    """One option per field of ``config_cls`` (``names`` replaces a field's option names;
    ``required`` fields must be given)."""
    params = []
    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        decls = [*(names or {}).get(name, [flag]), name]
        kind, item = _kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = field.description or ""
        if kind == "bool":
            decls = [f"{decls[0]}/--no-{decls[0][2:]}", *decls[1:]]
            params.append(click.Option(decls, default=default, show_default=True,
                                       help=help_text))
        elif kind == "list":
            params.append(click.Option(
                decls, multiple=True, default=(), metavar=f"{METAVARS.get(item, 'TEXT')}[,...]",
                help=f"{help_text} Repeat the option or separate values with commas."))
        elif kind == "dict":
            params.append(click.Option(
                decls, multiple=True, default=(), metavar="KEY=VALUE",
                help=f"{help_text} As KEY=VALUE, repeated or comma-separated."))
        else:
            params.append(click.Option(decls, type=item, show_default=default != "",
                                       default=None if name in required else default,
                                       required=name in required, help=help_text))
    return params


def build_config(config_cls: type, values: Mapping[str, Any]) -> Any:
    """The ``config_cls`` the options describe (pydantic checks the values, as the
    launchpad does)."""
    fields: dict[str, Any] = {}
    for name, field in config_cls.model_fields.items():
        if name not in values:
            continue
        option = "--" + name.replace("_", "-")
        kind, item = _kind(field.annotation)
        value = values[name]
        if kind == "list":
            value = [_typed(v, item, option) for v in _split(value)]
        elif kind == "dict":
            pairs = _split(value)
            bad = [p for p in pairs if "=" not in p]
            if bad:
                raise click.BadParameter(f"{bad[0]!r} is not KEY=VALUE", param_hint=option)
            value = {k.strip(): _typed(v.strip(), item, option)
                     for k, v in (p.split("=", 1) for p in pairs)}
        fields[name] = value
    return config_cls(**fields)
