"""The `expertlib` command. Each noun lives in its own module; this file only assembles them
and translates expertlib errors into one friendly message (exit code 2) in exactly one place."""

from __future__ import annotations

import importlib
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
]


class ExpertlibGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ExpertlibError as exc:
            click.secho(f"error: {exc.message}", fg="red", err=True)
            if exc.hint:
                click.echo(f"  hint: {exc.hint}", err=True)
            sys.exit(2)


@click.group(cls=ExpertlibGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="expertlib")
def cli() -> None:
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
