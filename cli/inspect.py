"""`expertlib inspect`: the MoE structure of a base model."""

from __future__ import annotations

import click

from expertlib.cli.output import emit, json_option, print_table


@click.command("inspect")
@click.argument("base")
@click.option(
    "--data",
    "datasets",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="jsonl dataset(s): also show how their routing concentrates on a few experts and how much "
    "their top experts overlap (ESFT's premise). Repeatable.",
)
@json_option
def inspect_cmd(base: str, datasets: tuple[str, ...], as_json: bool) -> None:
    """Show the MoE structure of BASE (a model folder or hub id).

    With --data, also the specialisation of each dataset's routing: the share of its routing
    mass on its top-k experts (k = experts per token) and the overlap of top experts between
    datasets.

    Example: expertlib inspect ./models/tiny-qwen2-moe --data math.jsonl --data code.jsonl
    """
    from expertlib.identity import base_identity
    from expertlib.moe import describe, load_model

    model = load_model(base)
    spec = describe(model)
    data = {**spec.to_dict(), "identity": base_identity(model, name=base).model_dump()}
    special = None
    if datasets:
        from pathlib import Path

        from expertlib.esft.data import load_samples, load_tokenizer, pad_token_id
        from expertlib.esft.diagnostics import routing_shares, specialisation

        model.float()
        tok = load_tokenizer(base)
        shares = {
            Path(d).stem: routing_shares(
                model, load_samples(d, tok, too_long="truncate"), pad_id=pad_token_id(tok)
            )
            for d in datasets
        }
        special = specialisation(shares, k=model.config.num_experts_per_tok)
        data["specialisation"] = special.model_dump()

    def render(d):
        rows = [(k, v) for k, v in d.items() if k != "identity"]
        rows.append(("config_digest", d["identity"]["config_digest"]))
        rows = [(k, v) for k, v in rows if k != "specialisation"]
        print_table(f"MoE structure of {base}", ["field", "value"], rows)
        if special is not None:
            from expertlib.esft.diagnostics import format_specialisation

            click.echo(format_specialisation(special))

    emit(as_json, data, render)


COMMANDS = [inspect_cmd]
