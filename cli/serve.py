"""`expertlib serve`: the OpenAI-compatible server over one base model and its expert sets."""

from __future__ import annotations

import json

import click


def _engine_arg(ctx, param, values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        try:
            out[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = raw
    return out


@click.command("serve")
@click.argument("base")
@click.option("--registry", "registry", metavar="DIR", help="Registry root to resolve expert sets in.")
@click.option(
    "--expert-set",
    "expert_sets",
    multiple=True,
    metavar="NAME",
    help="Load this set before ready: task, task@version, task@tag or a .safetensors patch (repeatable).",
)
@click.option("--all", "all_sets", is_flag=True, help="Load every registered set of this base before ready.")
@click.option("--slots", type=click.IntRange(min=1), help="Extra expert slots per MoE layer.")
@click.option("--max-sets", type=click.IntRange(min=1), help="Most expert sets resident at once.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="EXPERTLIB_API_KEY", help="Required on inference routes (Bearer).")
@click.option(
    "--admin-key", envvar="EXPERTLIB_ADMIN_KEY", help="Enables admin routes and guards them (Bearer)."
)
@click.option(
    "--load-on-demand", is_flag=True, help="Load a registered set the first time a request names it."
)
@click.option(
    "--max-queue",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests admitted at once; more get 429.",
)
@click.option("--served-name", help="The base model's `model` name (default: BASE as given).")
@click.option(
    "--engine-arg",
    "engine_args",
    multiple=True,
    callback=_engine_arg,
    metavar="KEY=VALUE",
    help="Extra vLLM engine argument, e.g. max_model_len=2048 or enforce_eager=true (repeatable).",
)
def serve_cmd(base: str, **opts) -> None:
    """Serve BASE and its expert sets with an OpenAI-compatible API.

    `model` in a request selects the expert set (task, task@version, task@tag) or the base;
    requests for different sets share the engine's batches. GET /health is 503 until the
    engine and the named sets are loaded.

    \b
    Example: expertlib serve ./base --registry ./reg --expert-set math --expert-set code@2
    """
    from expertlib.server import ServerSettings, serve

    if opts["all_sets"] and opts["expert_sets"]:
        raise click.UsageError("use either --expert-set or --all, not both")
    serve(ServerSettings(base=base, **{k: v for k, v in opts.items() if v is not None}))


COMMANDS = [serve_cmd]
