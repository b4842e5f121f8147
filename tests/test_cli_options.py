"""CLI options generated from config models carry the model's defaults, types and descriptions."""

from __future__ import annotations

import click
from click.testing import CliRunner

from expertlib.cli.main import cli
from expertlib.cli.options import field_options
from expertlib.esft.training import TrainConfig


def test_train_options_come_from_train_config():
    train = cli.commands["train"]
    opts = {p.name: p for p in train.params if isinstance(p, click.Option)}
    for name in ("lr", "steps", "schedule", "dtype", "gradient_checkpointing", "early_stop", "seed"):
        field = TrainConfig.model_fields[name]
        assert opts[name].default == field.default, name
        assert opts[name].help and field.description.split()[0].lower() in opts[name].help.lower(), name
    assert list(opts["schedule"].type.choices) == ["cosine", "linear", "constant"]
    assert opts["gradient_checkpointing"].is_flag


def test_generated_options_parse_into_the_config():
    @click.command()
    @field_options(TrainConfig, "lr", "schedule", "gradient_checkpointing")
    def cmd(**kw):
        click.echo(TrainConfig(**kw).model_dump_json())

    out = CliRunner().invoke(cmd, ["--lr", "0.003", "--schedule", "constant", "--gradient-checkpointing"])
    cfg = TrainConfig.model_validate_json(out.output)
    assert (cfg.lr, cfg.schedule, cfg.gradient_checkpointing) == (0.003, "constant", True)
    bad = CliRunner().invoke(cmd, ["--schedule", "exponential"])
    assert bad.exit_code == 2 and "exponential" in bad.output


def test_every_pipeline_setting_is_a_train_option():
    """Each field of train_esft's setting groups reaches `expertlib train`: generated from the field
    (same name, default and help) or one of the few hand-written options that read it differently."""
    from expertlib.esft.pipeline import DataConfig, RuntimeConfig, SelectionConfig

    by_hand = {"progress"}  # the command's own progress bars
    opts = {p.name: p for p in cli.commands["train"].params if isinstance(p, click.Option)}
    for group in (SelectionConfig, DataConfig, RuntimeConfig):
        for name, field in group.model_fields.items():
            if name in by_hand:
                continue
            assert name in opts, f"{group.__name__}.{name} has no --{name.replace('_', '-')} option"
            assert opts[name].default == field.default, name
            assert field.description.split()[0].lower() in opts[name].help.lower(), name
    assert opts["top_p"].type == click.FLOAT  # `float | None`: a float, or left out


def _commands(group=cli, prefix=""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield prefix + name, cmd


def _signature(opt: click.Option):
    return (
        tuple(opt.opts),
        tuple(opt.secondary_opts),
        opt.default,
        opt.help,
        repr(opt.type),
        opt.multiple,
        opt.envvar,
    )


#: one word, a different thing per command (what it writes, its own task or base argument, ...)
NOT_SHARED = {"out", "output", "task", "tasks", "base", "data", "expert_sets", "general", "as_json"}
#: the same setting where a command has a reason of its own: (command, option) -> why
OWN = {
    ("eval", "api_key"): "the key of the server eval talks to, not the key a server is started with",
    ("demo", "port"): "the demo's server takes a free port",
    ("demo", "steps"): "the demo's recipe: 300 steps, 100 with --quick",
    ("demo", "lr"): "the demo's recipe: 3e-3",
}


def test_every_command_shares_its_settings():
    """A setting offered by several commands (max length, token budget, selection, device, registry,
    ...) has one spelling, default, type and help in all of them."""
    by_name: dict[str, dict[str, tuple]] = {}
    for cmd_name, cmd in _commands():
        for opt in cmd.params:
            shared = isinstance(opt, click.Option) and not opt.hidden and opt.name not in NOT_SHARED
            if shared and (cmd_name, opt.name) not in OWN:
                by_name.setdefault(opt.name, {})[cmd_name] = _signature(opt)
    differ = {name: by for name, by in by_name.items() if len(set(by.values())) > 1}
    assert differ == {}
    assert {"score", "train"} <= set(by_name["max_length"]) & set(by_name["token_budget"])
    assert {"select", "train"} <= set(by_name["train_shared_experts"])
    assert {"serve", "eval", "list", "publish"} <= set(by_name["registry"])


def test_shared_settings_keep_the_library_defaults():
    """`score` uses train's data settings (max length 2048, not 4096) and the library's token budget."""
    import inspect

    from expertlib.esft.pipeline import DataConfig, SelectionConfig
    from expertlib.esft.scoring import score_task

    params = inspect.signature(score_task).parameters
    assert params["max_length"].default == DataConfig.model_fields["max_length"].default == 2048
    assert params["too_long"].default == DataConfig.model_fields["too_long"].default
    assert params["token_budget"].default == SelectionConfig.model_fields["token_budget"].default == 131072
    assert (
        params["count_prompt_tokens"].default == SelectionConfig.model_fields["count_prompt_tokens"].default
    )
    assert params["dtype"].default == TrainConfig.model_fields["dtype"].default
    opts = {p.name: p for p in cli.commands["score"].params}
    assert opts["max_length"].default == 2048 and opts["token_budget"].default == 131072


def test_old_spellings_still_work_hidden_and_warned(tmp_path, capsys):
    """`select --shared-experts` is now `--train-shared-experts`, as in train; scripts keep working."""
    select = cli.commands["select"]
    assert "--shared-experts" not in select.get_help(click.Context(select))
    scores = tmp_path / "s.json"
    scores.write_text("{}")

    def parsed(*args):
        return select.make_context("select", [str(scores), "--out", "x.json", *args]).params

    for flag in ("--shared-experts", "--train-shared-experts"):
        assert parsed(flag)["train_shared_experts"] is True
        assert ("deprecated" in capsys.readouterr().err) == (flag == "--shared-experts")
    assert parsed("--non-expert-modules", "--train-shared-experts")["train_non_expert_modules"] is True
    assert parsed()["train_shared_experts"] is False


def test_generated_options_carry_the_bounds():
    from expertlib.esft.pipeline import SelectionConfig

    @click.command()
    @field_options(SelectionConfig, "keep_share", "token_budget")
    def cmd(**kw):
        click.echo(SelectionConfig(**kw).model_dump_json())

    for bad in (["--keep-share", "0"], ["--keep-share", "1.5"], ["--token-budget", "-1"]):
        res = CliRunner().invoke(cmd, bad)
        assert res.exit_code == 2 and "range" in res.output, bad
    assert CliRunner().invoke(cmd, ["--keep-share", "1"]).exit_code == 0


def test_help_groups_commands_by_task():
    out = CliRunner().invoke(cli, ["--help"]).output
    sections = [line.rstrip(":") for line in out.splitlines() if line and not line.startswith(" ")]
    assert {"Training", "Registry", "Serving"} <= set(sections)
    listed = [
        line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("  -")
    ]
    assert sorted(set(listed) & set(cli.commands)) == sorted(cli.commands)  # every command, once
