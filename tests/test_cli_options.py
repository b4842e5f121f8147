"""CLI options generated from config models carry the model's defaults, types and descriptions."""

from __future__ import annotations

import click
from click.testing import CliRunner

from expertlib.cli.main import cli
from expertlib.cli.output import config_options
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
    @config_options(TrainConfig, ["lr", "schedule", "gradient_checkpointing"])
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

    by_hand = {"experts", "token_budget", "count_prompt_tokens", "eval_data", "checkpoint_dir", "progress"}
    opts = {p.name: p for p in cli.commands["train"].params if isinstance(p, click.Option)}
    for group in (SelectionConfig, DataConfig, RuntimeConfig):
        for name, field in group.model_fields.items():
            if name in by_hand:
                continue
            assert name in opts, f"{group.__name__}.{name} has no --{name.replace('_', '-')} option"
            assert opts[name].default == field.default, name
            assert field.description.split()[0].lower() in opts[name].help.lower(), name
    assert opts["top_p"].type == click.FLOAT  # `float | None`: a float, or left out
