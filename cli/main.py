"""The `expertlib` command. Each noun lives in its own module; this file only assembles them
and translates errors into one friendly message (exit code 2) in exactly one place: expertlib's
own errors with their hint, and the plain `ValueError`/`KeyError`/`OSError` a library or the
file system raises. `expertlib --debug ...` (or `EXPERTLIB_DEBUG=1`) shows the traceback instead."""

from __future__ import annotations

import importlib
import os
import sys

import click

from expertlib import __version__
from expertlib.errors import ExpertlibError

#: Modules that contribute commands: each exposes `COMMANDS`, a list of click commands.
COMMAND_MODULES = [
    "expertlib.cli.inspect",
    "expertlib.cli.train",
    "expertlib.cli.eval",
    "expertlib.cli.registry",
    "expertlib.cli.serve",
    "expertlib.cli.demo",
    "expertlib.cli.compose",
]

#: `expertlib --help` lists the commands by task (they stay where users type them: `expertlib NAME`)
SECTIONS = {
    "Getting started": ["demo"],
    "Training": ["score", "select", "train", "inspect", "eval"],
    "Registry": ["publish", "list", "show", "diff", "tag", "rm", "gc", "verify", "push", "pull"]
    + ["import-esft", "export-esft", "compose", "profile"],
    "Serving": ["serve"],
}

#: Plain exceptions that mean bad input or a file-system problem, not a bug: one line, no traceback.
PLAIN_USER_ERRORS = (ValueError, KeyError, OSError)

DEBUG_HINT = "run `expertlib --debug ...` (or set EXPERTLIB_DEBUG=1) to see the traceback"


def _fail(message: str, hint: str | None) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    sys.exit(2)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("EXPERTLIB_DEBUG", "") not in ("", "0")


class ExpertlibGroup(click.Group):
    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        placed = [n for names in SECTIONS.values() for n in names]
        sections = {**SECTIONS, "Other commands": sorted(set(self.list_commands(ctx)) - set(placed))}
        width = formatter.width - 6 - max(len(n) for n in self.commands)
        for title, names in sections.items():
            rows = [
                (n, self.commands[n].get_short_help_str(width))
                for n in names
                if n in self.commands and not self.commands[n].hidden
            ]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ExpertlibError as exc:
            if _debug(ctx):
                raise
            _fail(exc.message, exc.hint)
        except PLAIN_USER_ERRORS as exc:
            if _debug(ctx):
                raise
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            _fail(f"{type(exc).__name__}: {detail}", DEBUG_HINT)


@click.group(cls=ExpertlibGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="expertlib")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def cli(debug: bool) -> None:
    """Manage and serve ESFT expert sets for Mixture-of-Experts models.

    Score which experts a task uses, train only those, publish the result to a registry, and
    serve many tasks' expert sets from one base model.
    """


for _name in COMMAND_MODULES:
    for _cmd in importlib.import_module(_name).COMMANDS:
        cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="expertlib")


if __name__ == "__main__":
    main()
