"""`expertlib serve`: the OpenAI-compatible server over one base model and its expert sets.

Every option is a field of `ServerSettings` (expertlib/server/settings.py): `setting(...)` takes the
option's type, bounds, default and help from the field, as `config_options` does for `train`; what a
field cannot say (a flag's spelling, SIZE strings, environment variables) is given beside it here.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable
from typing import Any

import click
from pydantic_core import PydanticUndefined

from expertlib.server.settings import ServerSettings


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


def setting(name: str, *decls: str, **overrides: Any) -> Callable:
    """A click option for field `name` of ServerSettings: `--field-name` (or `decls`), the field's
    type (bounds as an IntRange, a bool as a flag, a list as a repeatable option), its default and its
    description as help; `overrides` are passed to click.option last."""
    info = ServerSettings.model_fields[name]
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]  # `int | None` -> int
    flag = decls[0] if decls else "--" + name.replace("_", "-")
    default = None if info.default in (PydanticUndefined, None) else info.default
    kw: dict[str, Any] = {"default": default, "show_default": default is not None}
    if info.description:
        kw["help"] = info.description[0].upper() + info.description[1:] + "."
    if annotation is bool:
        kw["show_default"] = default is True
        if default is True:
            flag = f"{flag}/--no-{flag[2:]}"
        else:
            kw["is_flag"] = True
    elif typing.get_origin(annotation) is list:
        kw.update(multiple=True, default=None, show_default=False)
    elif annotation is int:
        bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "le") if hasattr(m, k)}
        kw["type"] = click.IntRange(min=bounds.get("ge"), max=bounds.get("le")) if bounds else click.INT
    elif annotation is str:
        kw["type"] = click.STRING
    kw.update(overrides)
    if kw.get("multiple") and "help" in kw:
        kw["help"] = kw["help"].rstrip(".") + " (repeatable)."
    return click.option(flag, name, **kw)


_SIZE = dict(callback=_size, metavar="SIZE", type=click.STRING)


@click.command("serve")
@click.argument("base")
@setting("registry", metavar="DIR")
@setting("expert_sets", "--expert-set", metavar="NAME")
@setting("all_sets", "--all")
@setting("slots", callback=_slots, metavar="auto|N", type=click.STRING)
@setting("expert_memory", **_SIZE)
@setting("max_sets")
@setting("kv_cache_memory", **_SIZE)
@setting("max_model_len", type=click.IntRange(min=16))
@setting("host_cache_memory", **_SIZE)
@setting("verify_loads", type=click.Choice(["once", "always"]))
@setting("weight_bound", type=click.FloatRange(min=0, min_open=True), metavar="FACTOR")
@setting("auto_threshold", type=click.FloatRange(min=0, max=1), metavar="SIMILARITY")
@setting("host")
@setting("port")
@setting("api_key", envvar="EXPERTLIB_API_KEY")
@setting("admin_key", envvar="EXPERTLIB_ADMIN_KEY")
@setting("metrics_key", envvar="EXPERTLIB_METRICS_KEY")
@setting("max_request_sequences")
@setting("max_body_bytes")
@setting("max_prompt_chars")
@setting("load_on_demand")
@setting("max_queue")
@setting("default_max_tokens")
@setting("served_name")
@setting(
    "engine_args", "--engine-arg", callback=_engine_arg, metavar="KEY=VALUE", type=click.STRING, multiple=True
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Run N engine replicas under Ray Serve, a request routed to a replica holding its set "
    '(needs expertlib[ray]; see "Serving past one machine" in README).',
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    default=None,
    help="With --replicas: the Ray cluster to join (default: start a local one).",
)
def serve_cmd(base: str, replicas: int | None, ray_address: str | None, **opts) -> None:
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
    Replicas: expertlib serve ./base --registry ./reg --replicas 2
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
    settings = ServerSettings(base=base, **{k: v for k, v in opts.items() if v is not None})
    if replicas is None:
        if ray_address is not None:
            raise click.UsageError("--ray-address needs --replicas N")
        serve(settings)
    else:
        from expertlib.server.replicas import serve_replicated

        serve_replicated(settings, replicas, ray_address=ray_address)


COMMANDS = [serve_cmd]
