"""Shared CLI output helpers: `--json` on every listing, rich tables otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table."
)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def print_table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console(width=max(100, 20 * len(columns))).print(table)


def emit(as_json: bool, data: Any, render: Callable[[Any], None]) -> None:
    """Print `data` as JSON, or call `render(data)` for the human form."""
    emit_json(data) if as_json else render(data)


def config_options(model: type, fields: Sequence[str]) -> Callable:
    """Click options generated from fields of a pydantic config model: `--field-name`, with the
    field's type (a `Literal` becomes a choice, a bool a flag), its default and its description as
    help, so the CLI and the config that `expertlib` writes beside its results never disagree."""
    import typing

    def option(name: str) -> Callable:
        info = model.model_fields[name]
        annotation = info.annotation
        optional = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(optional) == 1 and len(typing.get_args(annotation)) == 2:  # `X | None`: an X or nothing
            annotation = optional[0]
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"default": info.default, "show_default": True}
        if info.description:
            kw["help"] = info.description[0].upper() + info.description[1:] + "."
        if annotation is bool and info.default is True:  # on by default: `--x/--no-x`
            flag = f"{flag}/--no-{flag[2:]}"
            kw.update(is_flag=True, show_default=False)
        elif annotation is bool:
            kw.update(is_flag=True, show_default=False)
        elif typing.get_origin(annotation) is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
            kw.update(type=typing.get_args(annotation)[0], multiple=True)  # repeatable
        elif typing.get_origin(annotation) is typing.Literal:
            kw["type"] = click.Choice(list(typing.get_args(annotation)))
        else:
            kw["type"] = annotation
        return click.option(flag, name, **kw)

    def decorate(fn: Callable) -> Callable:
        for name in reversed(fields):
            fn = option(name)(fn)
        return fn

    return decorate
