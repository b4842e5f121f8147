"""`expertlib serve` on the command line: help, and option parsing into ServerSettings."""

from __future__ import annotations

from click.testing import CliRunner

from expertlib.cli.main import cli


def test_serve_help_lists_every_option():
    res = CliRunner().invoke(cli, ["serve", "--help"])
    assert res.exit_code == 0, res.output
    for flag in (
        "--registry",
        "--expert-set",
        "--all",
        "--slots",
        "--max-sets",
        "--host",
        "--port",
        "--api-key",
        "--admin-key",
        "--load-on-demand",
        "--max-queue",
        "--engine-arg",
    ):
        assert flag in res.output
    assert "Example: expertlib serve" in res.output


def test_serve_parses_options_into_settings(serve_settings):
    argv = [
        "./base",
        "--expert-set",
        "math",
        "--expert-set",
        "code@2",
        "--slots",
        "4",
        "--port",
        "0",
    ]
    argv += ["--engine-arg", "max_model_len=128", "--engine-arg", "enforce-eager=true", "--api-key", "k"]
    s = serve_settings(*argv)
    assert s.base == "./base" and s.expert_sets == ["math", "code@2"] and s.slots == 4 and s.port == 0
    assert s.engine_args == {"max_model_len": 128, "enforce_eager": True} and s.api_key == "k"
    assert s.admin_key is None and s.max_queue == 256 and s.host == "127.0.0.1"


def test_serve_refuses_bad_usage():
    res = CliRunner().invoke(cli, ["serve", "./base", "--all", "--expert-set", "x"])
    assert res.exit_code == 2 and "either --expert-set or --all" in res.output
    res = CliRunner().invoke(cli, ["serve", "./base", "--engine-arg", "novalue"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output


def test_serve_exits_with_a_clear_error_when_a_set_cannot_load(tmp_path):
    """The set names are checked before the engine starts, so this fails in well under a second."""
    from expertlib.registry import Registry

    Registry(tmp_path / "reg")
    argv = ["serve", str(tmp_path / "nowhere"), "--registry", str(tmp_path / "reg"), "--expert-set", "typo"]
    res = CliRunner().invoke(cli, [*argv, "--port", "0"])
    assert res.exit_code == 2, res.output
    assert "no expert set named 'typo'" in res.output


def test_every_setting_is_an_option_with_the_fields_default_and_help(serve_settings):
    """`expertlib serve`'s options are generated from ServerSettings: one per field, the field's
    description as help, and with no options given the settings equal the model's own defaults."""
    from expertlib.cli.serve import serve_cmd
    from expertlib.server import ServerSettings

    params = {p.name: p for p in serve_cmd.params}
    for name, info in ServerSettings.model_fields.items():
        assert name in params, f"ServerSettings.{name} has no `expertlib serve` option"
        if name != "base":
            assert params[name].help.lower().startswith(info.description.lower()[:30]), name
    assert serve_settings("./base", env={k: None for k in _KEY_ENV}) == ServerSettings(base="./base")
    res = CliRunner().invoke(cli, ["serve", "./base", "--port", "70000"])
    assert res.exit_code == 2 and "65535" in res.output  # the field's bounds (le=65535) reach the CLI


_KEY_ENV = ("EXPERTLIB_API_KEY", "EXPERTLIB_ADMIN_KEY", "EXPERTLIB_METRICS_KEY")
