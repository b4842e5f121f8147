"""`expertlib inspect`: the MoE structure of a base model."""

from __future__ import annotations

import click

from expertlib.cli.output import emit, json_option, print_table


@click.command("inspect")
@click.argument("base")
@json_option
def inspect_cmd(base: str, as_json: bool) -> None:
    """Show the MoE structure of BASE (a model folder or hub id).

    Example: expertlib inspect ./models/tiny-qwen2-moe --json
    """
    from expertlib.identity import base_identity
    from expertlib.moe import describe, load_model

    model = load_model(base)
    spec = describe(model)
    data = {**spec.to_dict(), "identity": base_identity(model, name=base).model_dump()}

    def render(d):
        rows = [(k, v) for k, v in d.items() if k != "identity"]
        rows.append(("config_digest", d["identity"]["config_digest"]))
        print_table(f"MoE structure of {base}", ["field", "value"], rows)

    emit(as_json, data, render)


COMMANDS = [inspect_cmd]
