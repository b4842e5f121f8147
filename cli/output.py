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
