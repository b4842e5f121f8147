"""The CLI boundary: every error a user can cause is one line with a hint and exit code 2; `--debug`
(or EXPERTLIB_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from expertlib.cli.main import ExpertlibGroup, cli


def group_raising(exc: BaseException) -> click.Group:
    """The real `expertlib` group's error handling around one command that raises `exc`."""

    @click.group(cls=ExpertlibGroup)
    @click.option("--debug", is_flag=True)
    def g(debug: bool) -> None:
        pass

    @g.command()
    def boom() -> None:
        raise exc

    return g


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad value 7"), KeyError("model.layers.3"), FileNotFoundError(2, "No such file", "x.json")],
)
def test_plain_errors_are_one_line(exc):
    res = CliRunner().invoke(group_raising(exc), ["boom"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert lines[0].startswith(f"error: {type(exc).__name__}: ")
    assert "Traceback" not in res.output
    assert "--debug" in lines[1]


def test_debug_shows_the_exception(monkeypatch):
    exc = ValueError("bad value 7")
    res = CliRunner().invoke(group_raising(exc), ["--debug", "boom"])
    assert res.exception is exc  # propagated, so click/python print the traceback
    monkeypatch.setenv("EXPERTLIB_DEBUG", "1")
    assert CliRunner().invoke(group_raising(exc), ["boom"]).exception is exc


def test_bugs_are_not_hidden():
    """A TypeError is a bug, not bad input: it keeps its traceback."""
    exc = TypeError("unsupported operand")
    assert CliRunner().invoke(group_raising(exc), ["boom"]).exception is exc


def test_real_command_bad_input(tmp_path):
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps({"a": 1}))
    res = CliRunner().invoke(cli, ["select", str(bad), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "hint:" in res.output
    assert "--debug" in CliRunner().invoke(cli, ["--help"]).output
