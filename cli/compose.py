"""`expertlib compose` and `expertlib profile`: make a set from sets, and record a set's routing profile."""

from __future__ import annotations

import click

from expertlib.cli.output import emit, json_option


@click.command("compose")
@click.argument("patches", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--task", required=True, help="Task name of the composed set (its name once published).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Where to write it (default: TASK.safetensors)."
)
@click.option(
    "--ordered",
    is_flag=True,
    help="Sets may replace the same experts: the earlier set's expert wins (the server's a>b). "
    "Without it such sets are refused, naming the experts.",
)
@json_option
def compose_cmd(
    patches: tuple[str, ...], task: str, output: str | None, ordered: bool, as_json: bool
) -> None:
    """Write one expert set holding the experts of every PATCHES file (what `model="a+b"` serves).

    The experts keep their tensors, so a server holding the parts shares their slots. Publish the
    result like any set.

    Example: expertlib compose sum.safetensors fill.safetensors --task sum-fill && expertlib publish sum-fill.safetensors
    """
    from expertlib.compose import compose_sets
    from expertlib.loading import open_expert_set
    from expertlib.registry.names import validate_name

    validate_name(task)
    sets = [open_expert_set(p).expert_set for p in patches]
    for es in sets:
        es.verify()
    es = compose_sets(sets, task=task, overlap="first" if ordered else "refuse")
    path = es.save(output or f"{task}.safetensors")
    m = es.manifest
    data = {"path": str(path), "task": task, "experts": m.num_experts, "content_digest": m.content_digest}
    emit(
        as_json,
        data,
        lambda d: click.echo(f"wrote {d['path']}: {d['experts']} experts ({d['content_digest']})"),
    )


@click.command("profile")
@click.argument("patch", type=click.Path(exists=True, dir_okay=False))
@click.option("--base", required=True, help="The base model folder the set belongs to.")
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    help="jsonl of the set's task (may be left out when the set has a profile and --anchor is given).",
)
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="jsonl of something the base already does well, recorded as a base anchor: model=auto keeps "
    "prompts like it on the base. Repeatable.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of in place.")
@json_option
def profile_cmd(
    patch: str, base: str, data: str | None, anchors: tuple[str, ...], output: str | None, as_json: bool
) -> None:
    """Record the routing profile of a set's task in its manifest (for `model="auto"`).

    Trained sets carry one; sets imported with `import-esft` or made by older versions get it
    here: DATA's prompts run through BASE and each MoE layer's share of top-k picks per expert is
    stored. Each --anchor is profiled the same way and stored as a base anchor (a prompt nearest it
    is served by the base). The tensors (and the content digest) stay as they are; publish the file
    again.

    Example: expertlib profile math.safetensors --base ./models/base --data math.jsonl --anchor chat.jsonl
    """
    from expertlib.esft.profiling import profile_file

    path, prof = profile_file(patch, base, data, anchors=anchors, output=output)
    data_out = {"path": str(path), "layers": len(prof.shares), "tokens": prof.tokens, "anchors": len(anchors)}
    emit(
        as_json,
        data_out,
        lambda d: click.echo(
            f"wrote {d['path']}: routing profile of {d['layers']} layers, {d['tokens']} tokens, "
            f"{d['anchors']} base anchors added"
        ),
    )


COMMANDS = [compose_cmd, profile_cmd]
