"""`expertlib serve`: the OpenAI-compatible server over one base model and its expert sets."""

from __future__ import annotations

import json

import click


def _size(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    from expertlib.sizing import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _slots(ctx, param, value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is neither 'auto' nor a number >= 1", ctx=ctx, param=param)


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
@click.option(
    "--slots",
    default="auto",
    show_default=True,
    callback=_slots,
    metavar="auto|N",
    help="Extra expert slots per MoE layer. auto: what the sets named at start need plus one typical "
    "set, or --expert-memory divided by one slot's size. Start-up refuses (with the numbers) sets that "
    "do not all fit.",
)
@click.option(
    "--expert-memory",
    callback=_size,
    metavar="SIZE",
    help="Memory for expert slots, e.g. 4GiB (sets --slots auto to SIZE / one slot in every MoE layer).",
)
@click.option(
    "--max-sets", type=click.IntRange(min=1), help="Most expert sets resident at once (default: sized)."
)
@click.option(
    "--kv-cache-memory",
    callback=_size,
    metavar="SIZE",
    help="KV cache size, e.g. 2GiB (vLLM's kv_cache_memory_bytes). Default on CPU: room for max-num-seqs "
    "sequences of max-model-len tokens, at most half the free memory after weights and slots.",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(min=16),
    help="Context length in tokens (default: the model's, shortened on CPU if its KV cache cannot fit).",
)
@click.option(
    "--host-cache-memory",
    callback=_size,
    metavar="SIZE",
    help="Host memory for recently used sets, so reloading an evicted set is a copy (default: 10% of "
    "free memory, at most 4GiB; 0 turns it off).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="EXPERTLIB_API_KEY", help="Required on inference routes (Bearer).")
@click.option(
    "--admin-key", envvar="EXPERTLIB_ADMIN_KEY", help="Enables admin routes and guards them (Bearer)."
)
@click.option(
    "--metrics-key",
    envvar="EXPERTLIB_METRICS_KEY",
    help="Key for GET /metrics (the admin key works too); /metrics is open only without any key.",
)
@click.option(
    "--max-request-sequences",
    type=click.IntRange(min=1),
    help="Most sequences (prompts x n) one request may ask for; more get 400 (default 64).",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    help="Largest inference request body in bytes; larger ones get 413 (default 16 MiB).",
)
@click.option(
    "--load-on-demand/--no-load-on-demand",
    default=True,
    show_default=True,
    help="Load a registered set that is not resident when a request names it (evicting the least "
    "recently used unpinned sets); requests for a set being loaded wait for it.",
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

    `model` in a request selects the expert set (task, task@version, task@tag, BASE:task) or
    the base; requests for different sets share the engine's batches. Any registered set of
    BASE is answerable: one that is not resident is loaded on its first request. GET /health
    is 503 until the engine and the named sets are loaded. Start-up prints the slot capacity
    and the KV cache it chose.

    Per-set Prometheus metrics (requests, tokens, latency, residency, loads, evictions, load
    time) are at GET /metrics. Scrape example:

    \b
      curl -s http://127.0.0.1:8000/metrics | grep 'model="math@1"'
      # prometheus.yml
      scrape_configs:
        - job_name: expertlib
          static_configs: [{targets: ["127.0.0.1:8000"]}]

    \b
    Example: expertlib serve ./base --registry ./reg --expert-set math --expert-set code@2
    """
    from expertlib.server import ServerSettings, serve

    if opts["all_sets"] and opts["expert_sets"]:
        raise click.UsageError("use either --expert-set or --all, not both")
    keys = [(k, opts.get(k)) for k in ("api_key", "admin_key", "metrics_key") if opts.get(k) is not None]
    for i, (a, ka) in enumerate(keys):
        for b, kb in keys[i + 1 :]:
            if ka == kb:
                raise click.UsageError(
                    f"--{a.replace('_', '-')} and --{b.replace('_', '-')} must differ: "
                    "with equal keys one would grant the other's routes"
                )
    serve(ServerSettings(base=base, **{k: v for k, v in opts.items() if v is not None}))


COMMANDS = [serve_cmd]
