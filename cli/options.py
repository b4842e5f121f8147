"""Command-line options generated from the fields of the settings models, by one function.

Every setting a command shares with another (`--max-length`, `--budget`, `--top-p`, `--device`,
...) is a field of a pydantic settings model (`SelectionConfig`, `DataConfig`, `TrainConfig`,
`RuntimeConfig`, `ServerSettings`); `field_option` turns that field into a click option, so the
option has the field's name, type (a `Literal` is a choice, bounds are a range, a bool is a flag, a
tuple or list is repeatable), default and description as help, in every command that offers it. What
a field cannot say (a different spelling, SIZE strings, an environment variable) is passed beside it.

    @click.command("score")
    @field_options(DataConfig, "max_length", "too_long")
    @field_option(SelectionConfig, "token_budget", "--budget")
    def score_cmd(max_length, too_long, token_budget): ...
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from expertlib.constants import REGISTRY_ENV
from expertlib.server.settings import ServerSettings


def _unwrap_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]  # `X | None`: an X, or the option left out
    return annotation


def _bounded(kind: type, metadata: Sequence[Any]) -> click.ParamType:
    """`int`/`float` with the field's `ge`/`gt`/`le`/`lt` as a click range."""
    lo = next(((getattr(m, k), k == "gt") for m in metadata for k in ("ge", "gt") if hasattr(m, k)), None)
    hi = next(((getattr(m, k), k == "lt") for m in metadata for k in ("le", "lt") if hasattr(m, k)), None)
    if lo is None and hi is None:
        return click.INT if kind is int else click.FLOAT
    kw = dict(min=lo and lo[0], max=hi and hi[0], min_open=bool(lo and lo[1]), max_open=bool(hi and hi[1]))
    return click.FloatRange(**kw) if kind is float else click.IntRange(**kw)


def help_text(model: type[BaseModel], name: str) -> str | None:
    """The option help of field `name`: its description, as a sentence."""
    desc = model.model_fields[name].description
    return desc[0].upper() + desc[1:] + "." if desc else None


def _option_kwargs(model: type[BaseModel], name: str, flag: str) -> tuple[str, dict[str, Any]]:
    info = model.model_fields[name]
    annotation = _unwrap_optional(info.annotation)
    default = None if info.default in (PydanticUndefined, None) else info.default
    kw: dict[str, Any] = {"default": default, "show_default": default is not None}
    if (h := help_text(model, name)) is not None:
        kw["help"] = h
    origin = typing.get_origin(annotation)
    if annotation is bool:
        kw["show_default"] = False
        if "/" in flag:
            kw["default"] = bool(default)
        elif default is True:  # on by default: `--x/--no-x`
            flag = f"{flag}/--no-{flag[2:]}"
            kw["show_default"] = True
        else:
            kw.update(is_flag=True, default=False)
    elif origin is typing.Literal:
        kw["type"] = click.Choice([str(c) for c in typing.get_args(annotation)])
    elif origin in (tuple, list):
        item = typing.get_args(annotation)[0]
        kw.update(multiple=True, show_default=bool(default), default=tuple(default or ()))
        kw["type"] = click.Path(path_type=Path) if item is Path else item
        if "help" in kw and "repeatable" not in kw["help"]:
            kw["help"] = kw["help"].rstrip(".") + " (repeatable)."
    elif annotation in (int, float):
        kw["type"] = _bounded(annotation, info.metadata)
    elif annotation is Path:
        kw["type"] = click.Path(path_type=Path)
    elif annotation is str:
        kw["type"] = click.STRING
    return flag, kw


def field_option(
    model: type[BaseModel],
    name: str,
    *decls: str,
    aliases: Sequence[str] = (),
    **overrides: Any,
) -> Callable:
    """A click option for field `name` of `model`: `--field-name` (or `decls[0]`, which may be a
    `--on/--off` pair), the field's type, default and description as help; `overrides` are passed to
    click.option last. `aliases` are old spellings, still accepted, hidden from help, and warned
    about: scripts keep working while the help shows one name."""
    flag, kw = _option_kwargs(model, name, decls[0] if decls else "--" + name.replace("_", "-"))
    kw.update(overrides)
    main = click.option(flag, *decls[1:], name, **kw)
    if not aliases:
        return main
    own_callback = kw.pop("callback", None)
    key = ("expertlib.alias", name)

    def take_alias(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if own_callback is not None:
            value = own_callback(ctx, param, value)
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE and key in ctx.meta:
            return ctx.meta[key]
        return value

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE:
            click.echo(f"warning: {param.opts[0]} is deprecated; use {flag.split('/')[0]}", err=True)
            if own_callback is not None:
                value = own_callback(ctx, param, value)
            ctx.meta[key] = value
            if name in ctx.params and ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
                ctx.params[name] = value  # the real option was processed first, with its default

    main = click.option(flag, *decls[1:], name, **{**kw, "callback": take_alias})
    alias_kw = {k: v for k, v in kw.items() if k not in ("help", "show_default", "envvar")}
    alias_kw["default"] = None if not kw.get("is_flag") else False

    def decorate(fn: Callable) -> Callable:
        fn = main(fn)
        for alias in aliases:
            fn = click.option(
                alias,
                f"alias_{alias.lstrip('-').replace('-', '_')}",
                hidden=True,
                expose_value=False,
                callback=remember,
                **alias_kw,
            )(fn)
        return fn

    return decorate


def field_options(model: type[BaseModel], *names: str) -> Callable:
    """`field_option` for each of `names`, in that order, with no overrides."""

    def decorate(fn: Callable) -> Callable:
        for name in reversed(names):
            fn = field_option(model, name)(fn)
        return fn

    return decorate


def take(model: type[BaseModel], kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the values of `model`'s fields out of a command's keyword arguments: the options
    generated from that model, ready for `model(**...)`."""
    return {k: kw.pop(k) for k in list(kw) if k in model.model_fields}


#: `--registry DIR`: one spelling, environment variable and help in every command that takes a registry
registry_option = field_option(ServerSettings, "registry", envvar=REGISTRY_ENV, metavar="DIR")
