"""What GET /v1/models and GET /admin/status show."""

from __future__ import annotations

import asyncio
from pathlib import Path

from expertlib.errors import NotFoundError
from expertlib.server.protocol import AdminStatus, LoadableSet, ModelCard, ModelList
from expertlib.server.state import ServerState


def public_name(name: str) -> str:
    """The base's name as public responses show it: a filesystem path only by its last part
    (the server answers to that name too)."""
    path = Path(name)
    return path.name if path.is_absolute() or len(path.parts) > 1 or path.exists() else name


async def model_list(state: ServerState) -> ModelList:
    """The base, the resident sets and the registered ones; the registry is read in a thread (a locked
    index: 503 with Retry-After after the serving busy timeout, while the event loop answers others)."""
    engine, catalog = state.require_ready()
    registered = await asyncio.to_thread(catalog.registered, strict=True)
    base = public_name(state.settings.model_name)
    status = engine.status()
    pinned = set(_pinned(status))
    history = status.get("history") or {}
    cards = [ModelCard(id=base, created=state.created, root=base)]
    # the server chooses the set from the prompt's routing (expertlib.server.sets.resolve_auto)
    cards.append(ModelCard(id="auto", created=state.created, parent=base, root=base, state="auto"))
    for name in catalog.loaded():
        cards.append(
            ModelCard(
                id=name,
                created=catalog.loaded_at.get(name, state.created),
                parent=base,
                root=base,
                aliases=catalog.aliases_of(name),
                pinned=name in pinned,
                state="resident",
            )
        )
    loadable = [
        LoadableSet(
            id=str(r),
            task=r.name,
            version=r.version,
            digest=r.digest,
            state="host" if history.get(str(r), {}).get("residency") == "host" else "disk",
        )
        for r in catalog.not_loaded(registered)
    ]
    return ModelList(data=cards, loadable=loadable)


async def model_card(state: ServerState, model_id: str) -> ModelCard:
    """One entry of the model list, by id or alias; NotFoundError otherwise."""
    for card in (await model_list(state)).data:
        if model_id == card.id or model_id in card.aliases:
            return card
    raise NotFoundError(
        f"the model {model_id!r} does not exist on this server", hint="GET /v1/models lists them"
    )


def admin_status(state: ServerState) -> AdminStatus:
    engine = state.engine
    status = dict(engine.status()) if engine is not None else {}
    if state.prepacker is not None:
        status["prepack"] = state.prepacker.status()
    return AdminStatus(
        ready=state.ready,
        base=state.settings.model_name,
        loaded=state.catalog.loaded() if state.catalog else [],
        engine=status,
        queue_depth=state.admission.depth,
        max_queue=state.admission.limit,
    )


def _pinned(status: dict) -> list[str]:
    pins = status.get("pinned", [])
    if isinstance(pins, dict):
        return [k for k, v in pins.items() if v]
    sets = status.get("sets")
    if isinstance(sets, dict):
        pins = list(pins) + [k for k, v in sets.items() if isinstance(v, dict) and v.get("pinned")]
    return list(pins)
