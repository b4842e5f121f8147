"""Which expert set a request's `model` names, and loading sets into the engine.

Names (all parsed here, in `SetCatalog.resolve`): the base model answers to its served name (and
its folder's basename). An expert set is served under `task@version` when it comes from the
registry (or `task` for a bare patch file), and also answers to `task` alone (the most recently
loaded version of that task, else the registry's latest). `task@version`, `task@tag` and
`task@blake3:...` resolve through the registry, and any of them may be prefixed by the base's name,
`BASE:task` (a prefix naming another base is a 404). A registered set that is not resident is
loaded on its first request (evicting the least recently used unpinned sets) unless
`load_on_demand` is off; concurrent requests for a set being loaded wait for that one load.

`resolve` turns a request's `model` into a `SetRef` (served name, content digest, set row, registry
version) once; that value travels with the request to the engine, which checks it rather than
resolving the name again. Registry entries are named by the registry's own `Ref` (name, version,
blob digest). A name is looked up in the registry once per request: the entry it resolves to is
opened as it is (`expertlib.loading.open_expert_set`, an `OpenedSet` carrying the served name and
version), never turned back into a string and parsed again.

Storage (the registry) and residency (the engine) stay separate: this module only connects them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from expertlib.errors import (
    ExpertlibError,
    InvalidNameError,
    InvalidRequestError,
    NotFoundError,
    NotLoadedError,
    RegistryBusyError,
    RemoteError,
    ServerBusyError,
    SlotsBusyError,
)
from expertlib.loading import OpenedSet, open_expert_set, refuse_name_clash
from expertlib.patch import ExpertSet
from expertlib.registry.names import Ref, validate_name
from expertlib.registry.protocol import Entry
from expertlib.server.backend import ServingEngine, maybe_await
from expertlib.slots import SetRef

#: A request waits this long for a slot when every resident set is pinned or busy, then gets 503.
SLOT_WAIT_S = 30.0
#: How `resolve_auto` names a base anchor among the candidates' similarities.
ANCHOR_PREFIX = "base:"

log = logging.getLogger("expertlib.server")


class SetCatalog:
    #: how long a request for a set that cannot be made resident now waits for a slot (seconds)
    slot_wait_s: float = SLOT_WAIT_S

    def __init__(
        self,
        engine: ServingEngine | None,
        base_name: str,
        registry: Any = None,
        *,
        registry_base: Any = None,
        load_on_demand: bool = True,
        on_load: Any = None,
    ):
        self.engine = engine
        self.registry_base = registry_base  # scopes registry lookups to this base (a folder path)
        self.base_name = base_name
        self.base_names = {base_name, Path(base_name).name}
        self.registry = registry
        self.load_on_demand = load_on_demand
        self.on_load = on_load  # called (name, seconds) after each load, for metrics
        self._aliases: dict[str, str] = {}  # task -> served name of its latest loaded version
        self._locks: dict[str, asyncio.Lock] = {}
        self.loaded_at: dict[str, int] = {}  # served name -> unix time it was loaded
        self._versions: dict[str, int | None] = {}  # served name -> registry version loaded under it

    # --- resolution ----------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        return list(self.engine.loaded_sets())

    def loading(self) -> list[str]:
        """Sets being loaded now (the requests that named them wait for the load)."""
        loaded = set(self.loaded())
        return [n for n, lock in self._locks.items() if lock.locked() and n not in loaded]

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, n in self._aliases.items() if n == name and a != name)

    def split_base(self, model: str) -> str:
        """`BASE:task` -> `task` when BASE is this server's base; NotFoundError for another base.
        Digest references (`task@blake3:...`, `task@sha256:...`) keep their colon."""
        prefix, sep, rest = model.partition(":")
        if not sep or "@" in prefix or not rest:
            return model
        if prefix in self.base_names:
            return rest
        raise NotFoundError(
            f"the model {model!r} names the base {prefix!r}, but this server serves {self.base_name!r}",
            hint=f"use {self.base_name}:TASK, or TASK alone",
        )

    async def resolve(self, model: str) -> SetRef | None:
        """The SetRef a request for `model` runs with, None for the base; loads on demand if enabled."""
        served = await self._resolve_name(model)
        return None if served is None else self.ref(served)

    def ref(self, served: str) -> SetRef:
        """The engine's SetRef of a resident set, with the registry version it was loaded from."""
        ref = self.engine.ref(served)
        version = self._versions.get(served)
        return ref if ref.version == version else replace(ref, version=version)

    async def _resolve_name(self, model: str) -> str | None:
        if model in self.base_names:
            return None
        model = self.split_base(model)
        if model in self.base_names:
            return None
        loaded = set(self.loaded())
        if model in loaded and await self._settled(model):
            return model
        alias = self._aliases.get(model)
        if alias in loaded and await self._settled(alias):
            return alias
        entry = await asyncio.to_thread(self._registry_resolve, model)  # SQLite off the event loop
        if entry is not None:
            served = str(entry.ref)
            if served in set(self.loaded()) and await self._settled(served):
                return served
            if self.load_on_demand:
                return await self._load_on_demand(entry)  # the entry itself: not looked up again
            raise NotLoadedError(
                f"expert set {served!r} is registered but not loaded",
                hint="load it with the admin route POST /admin/sets/load, or start the server without --no-load-on-demand",
            )
        if composition_parts(model) is not None:
            return await self._compose(model)
        raise NotFoundError(
            f"the model {model!r} does not exist on this server"
            + (f" nor on its remote {remote}" if (remote := getattr(self.registry, "remote", None)) else ""),
            hint="GET /v1/models lists the base and the loaded expert sets",
        )

    # --- compositions: `a+b` (sets replacing the same expert refused), `a>b` (a's experts win) -----

    async def _compose(self, model: str) -> str:
        """Serve the union of the named sets' experts as one set (`expertlib.compose.compose_sets`),
        under the parts' served names joined by '+' or '>'; resident compositions are reused."""
        parts, op = composition_parts(model) or ([], "+")
        resident = self._resident_files()  # read on the event loop: loads change the book meanwhile
        opened = [await asyncio.to_thread(self._open_part, part, model, resident) for part in parts]
        served = op.join(name for _, name in opened)
        if served in set(self.loaded()) and await self._settled(served):
            self._aliases[model] = served
            return served
        from expertlib.compose import compose_sets

        es = await asyncio.to_thread(
            compose_sets,
            [e for e, _ in opened],
            task=served,
            names=[n for _, n in opened],
            overlap="first" if op == ">" else "refuse",
        )
        served = await self._load_on_demand(OpenedSet(es, served))
        self._aliases[model] = served
        return served

    async def _settled(self, served: str) -> bool:
        """Whether `served`, which the engine lists, is resident, after waiting for a load of it in
        progress: the engine lists a set from the moment its load reserved slots but refuses its
        SetRef until the load is done (404 "being loaded"), so a request that finds a set listed while
        another request loads it waits for that load, as one that found it unlisted would."""
        lock = self._locks.get(served)
        if lock is not None and lock.locked():
            async with lock:
                pass
        return served in set(self.loaded())

    def _resident_files(self) -> dict[str, str | None]:
        """Served name -> file of every set the engine lists (None for one without a file). Read on
        the event loop: the engine's book is changed there, so a thread must not iterate it."""
        return {name: info.get("path") for name, info in self.engine.status().get("sets", {}).items()}

    def _open_part(self, part: str, model: str, resident: dict[str, str | None]) -> tuple[ExpertSet, str]:
        """One set named inside a composition: (the set, its served name), resident (`resident`, from
        `_resident_files`) or registered."""
        name = self.split_base(part)
        served = name if name in resident else self._aliases.get(name)
        if served in resident and resident[served]:
            return ExpertSet.open(resident[served]), served
        entry = self._registry_resolve(name)
        if entry is None:
            raise NotFoundError(
                f"the composition {model!r} names {part!r}, which does not exist on this server",
                hint="GET /v1/models lists the base and the loaded expert sets",
            )
        opened = self._open(entry)
        return opened.expert_set, opened.name

    # --- model="auto": the set whose routing profile matches the prompt's routing -------------------

    async def resolve_auto(
        self, prompt_ids: list[int], threshold: float
    ) -> tuple[SetRef | None, dict[str, float]]:
        """The set to serve a `model="auto"` request: the prompt's routing under the base (one base
        prefill in the engine, `routing_of`) against the routing profile of every set this server
        may serve (resident or registered; sets without a profile never match) and against the base
        anchors those sets carry (profiles of what the base already does), by
        `expertlib.profile.similarity`. The best candidate at or above `threshold` serves when it is a
        set; an anchor, or nothing that close, means the base (None). Also returns every candidate's
        similarity (anchors as `ANCHOR_PREFIX + name`). No set: no prefill at all."""
        from expertlib.profile import similarity

        status = self.engine.status().get("sets", {})  # on the event loop, as `_resident_files`
        profiles, anchors = await asyncio.to_thread(self._profiles, status)
        if not profiles:
            return None, {}
        shares = await self.engine.routing_of(prompt_ids)
        scores = {name: similarity(shares, prof) for name, prof in profiles.items()}
        scores |= {ANCHOR_PREFIX + name: similarity(shares, prof) for name, prof in anchors.items()}
        best = max(scores, key=lambda n: (scores[n], n))
        if scores[best] < threshold or best not in profiles:
            return None, scores
        return await self.resolve(best), scores

    def _profiles(self, status: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
        """(served name or registry reference -> routing profile (layer -> (E,) shares) of every set
        this server may serve that has one, base anchor name -> profile of every anchor those sets
        carry); manifests are read once per content digest. `status`: the engine's sets, as
        `engine.status()["sets"]` gave them on the event loop (this runs on a thread)."""
        cache = self.__dict__.setdefault("_profile_cache", {})
        named: dict[str, tuple[str, Any]] = {}  # name -> (content digest, how to open it)
        for name in status:
            info = status.get(name, {})
            if composition_parts(name) is None and info.get("path") and info.get("content_digest"):
                named[name] = (info["content_digest"], info["path"])
        loaded_tasks = {n.split("@")[0] for n in named}
        for ref in self.registered():
            # one candidate per task: the resident version, else the registry's latest (listed first)
            if ref.name not in loaded_tasks and not any(n.split("@")[0] == ref.name for n in named):
                named[str(ref)] = (ref.digest, ref)
        out: dict[str, dict] = {}
        anchors: dict[str, dict] = {}
        for name, (digest, where) in named.items():
            if digest not in cache:
                try:
                    es = (
                        ExpertSet.open(where)
                        if isinstance(where, str)
                        else self.registry.open(where, base=self.registry_base)
                    )
                    prov = es.manifest.provenance
                    prof = prov.routing_profile.arrays() if prov.routing_profile is not None else None
                    cache[digest] = (prof, {a: p.arrays() for a, p in prov.base_anchors.items()})
                except ExpertlibError as exc:
                    log.warning("no routing profile for %s: %s", name, exc.message)
                    cache[digest] = (None, {})
            prof, carried = cache[digest]
            if prof is not None:
                out[name] = prof
                for a, p in carried.items():
                    anchors.setdefault(a, p)
        return out, anchors

    # --- registry --------------------------------------------------------------------------------

    def _registry_resolve(self, text: str) -> Entry | None:
        """The registry's entry for `text` (None when it names nothing there): the one look-up of a
        name; the entry is opened as it is (`_open`)."""
        if self.registry is None:
            return None
        try:
            return self.registry.resolve(text, base=self.registry_base)
        except (RegistryBusyError, RemoteError):
            raise  # 503 + Retry-After / 502 (a --pull-from remote out of reach), not "no such model"
        except (NotFoundError, KeyError, ExpertlibError, ValueError):
            return None

    def registered(self, *, strict: bool = False) -> list[Ref]:
        """Every set the registry holds (latest version of each task first); empty without one.
        `strict`: a locked index raises RegistryBusyError (503) instead of listing nothing."""
        if self.registry is None:
            return []
        try:
            entries = list(self.registry.list(base=self.registry_base))
        except RegistryBusyError:
            if strict:
                raise
            log.warning("registry listing failed: the index is locked")
            return []
        except ExpertlibError as exc:
            log.warning("registry listing failed: %s", exc)
            return []
        return [e.ref for e in entries]

    def loadable(self) -> list[Ref]:
        return self.not_loaded(self.registered())

    def not_loaded(self, refs: list[Ref]) -> list[Ref]:
        loaded = set(self.loaded())
        return [r for r in refs if str(r) not in loaded]

    # --- residency -------------------------------------------------------------------------------

    async def load(self, name: str | Entry | OpenedSet, *, pin: bool = False) -> str:
        """Load a registry reference, a patch file, a registry entry resolved already, or a set opened
        already (a composition); return the name it is served under. Loads of one set are
        serialised: a second caller waits for the first load and then finds it resident."""
        # registry lookup and the blob's digest check read files: off the event loop
        opened = name if isinstance(name, OpenedSet) else await asyncio.to_thread(self._open, name)
        served = opened.name
        # a registry set also answers to its task alone; a file or a composition to its served name
        task = served.partition("@")[0] if opened.version is not None else served
        lock = self._locks.setdefault(served, asyncio.Lock())
        async with lock:
            if served in set(self.loaded()):
                self._check_same(served, opened.expert_set)
                if pin:
                    await maybe_await(self.engine.pin(served, True))
            else:
                before = set(self.loaded())
                start = time.perf_counter()
                served = await self.engine.load(opened, name=served, pin=pin)
                seconds = time.perf_counter() - start
                for gone in before - set(self.loaded()):
                    self._forget(gone)
                    log.info("expert set %s evicted (least recently used) to make room for %s", gone, served)
                if self.on_load is not None:
                    self.on_load(served, seconds)
                log.info("loaded expert set %s in %.3f s", served, seconds)
            self._aliases[task] = served
            self.loaded_at[served] = int(time.time())
            self._versions[served] = opened.version
            return served

    async def reload(self, served: str) -> None:
        """The engine's `on_missing`: a set evicted after a request resolved it is loaded again."""
        if not self.load_on_demand:
            raise NotLoadedError(
                f"expert set {served!r} was evicted", hint="retry, or load it with POST /admin/sets/load"
            )
        entry = self._registry_resolve(served)
        if entry is None and composition_parts(served) is not None:
            await self._compose(served)
            return
        await self._load_on_demand(entry or served)

    async def _load_on_demand(self, name: str | Entry | OpenedSet) -> str:
        """`load` for a request: no set can be evicted while every resident one is pinned or serving
        requests, a state that passes. The request waits for it, holding its place in the bounded
        queue, until a resident set can go (the engine's `wait_for_slots`), for `slot_wait_s` at
        most; then the client is told to retry (503 + Retry-After), not 409."""
        deadline = time.monotonic() + self.slot_wait_s
        while True:
            try:
                return await self.load(name)
            except SlotsBusyError as exc:
                wait = getattr(self.engine, "wait_for_slots", None)
                left = deadline - time.monotonic()
                if wait is None or left <= 0 or not await wait(left):
                    raise ServerBusyError(
                        f"expert set {_shown(name)!r} cannot be loaded right now: {exc.message}",
                        hint="retry after a short wait",
                    ) from None

    def _check_same(self, served: str, es: ExpertSet) -> None:
        """SlotError (409) when `served` is resident with other tensors than `es` (another file of
        the same task): a load never keeps the old set while answering as if it had loaded the new."""
        refuse_name_clash(
            served,
            self.engine.ref(served).digest,
            es.manifest.content_digest,
            hint=f"unload {served!r} first (POST /admin/sets/unload), then load this file",
        )

    def _forget(self, served: str) -> None:
        self._aliases = {a: n for a, n in self._aliases.items() if n != served}
        self.loaded_at.pop(served, None)

    async def unload(self, model: str) -> str:
        served = self._served(model)
        await self.engine.unload(served)
        self._forget(served)
        self._versions.pop(served, None)
        return served

    async def pin(self, model: str, pinned: bool = True) -> str:
        served = self._served(model)
        await maybe_await(self.engine.pin(served, pinned))
        return served

    def check(self, name: str) -> None:
        """Raise the error loading `name` would raise for a missing file or registry entry."""
        self._open(name)

    def expert_map(self, name: str) -> dict[int, list[int]]:
        """The layer -> experts map of a set to load (from its manifest; no tensor is read)."""
        return dict(self._open(name).manifest.experts)

    def registered_maps(self) -> list[dict[int, list[int]]]:
        """The expert maps of every registered set of this base (from the registry's index)."""
        if self.registry is None:
            return []
        try:
            return [dict(e.experts) for e in self.registry.list(base=self.registry_base)]
        except (ExpertlibError, AttributeError):
            return []

    def _served(self, model: str) -> str:
        model = self.split_base(model)
        loaded = set(self.loaded())
        if model in loaded:
            return model
        if self._aliases.get(model) in loaded:
            return self._aliases[model]
        entry = self._registry_resolve(model)
        if entry is not None and str(entry.ref) in loaded:
            return str(entry.ref)
        raise NotLoadedError(
            f"expert set {model!r} is not loaded", hint="GET /admin/status lists the loaded sets"
        )

    def open_set(self, name: str | Entry | Ref) -> OpenedSet:
        """A set to load, opened and its blob checked as a load opens it, without loading it (what
        packing ahead packs). Reads files: off the event loop."""
        return self._open(str(name) if isinstance(name, Ref) else name)

    def _open(self, name: str | Entry) -> OpenedSet:
        """The set a patch file, a registry reference (`BASE:` prefix allowed) or a registry entry
        resolved already names, opened once (`expertlib.loading.open_expert_set`) under the name it
        is served under (`task` for a file, `task@version` from the registry) with its version."""
        if isinstance(name, Entry):
            return self._open_entry(name)
        opened = open_expert_set(self.split_base(name), open_named=self._open_named)
        if opened.version is None:  # a patch file: served under its task name
            task = opened.name
            validate_name(task, what="the patch's task name (its served name)")  # no paths, no '@'
            if task in self.base_names:
                raise InvalidNameError(
                    f"the patch's task name {task!r} is the base model's name",
                    hint="publish it to the registry under another name (expertlib publish --task NAME)",
                )
        return opened

    def _open_named(self, name: str) -> OpenedSet:
        """A registry reference, looked up once and opened (`open_expert_set`'s opener)."""
        if self.registry is None:
            raise NotFoundError(
                f"{name!r} is not a patch file and the server has no registry",
                hint="pass a .safetensors patch path, or start the server with --registry DIR",
            )
        return self._open_entry(self.registry.resolve(name, base=self.registry_base))

    def _open_entry(self, entry: Entry) -> OpenedSet:
        """A registry entry resolved already, opened without looking its name up again."""
        es = self.registry.open(entry, base=self.registry_base)
        return OpenedSet(es, str(entry.ref), entry.ref.version)


def _shown(name: str | Entry | OpenedSet) -> str:
    """How a set to load is named in messages."""
    if isinstance(name, Entry):
        return str(name.ref)
    return name.name if isinstance(name, OpenedSet) else name


def composition_parts(model: str) -> tuple[list[str], str] | None:
    """`a+b` -> (["a", "b"], "+"), `a>b` -> (["a", "b"], ">"); None for a name that is no composition.
    A name may hold '+' (a task name can): the catalog tries it as one set first. Mixing '+' and '>',
    or an empty part, is a 400."""
    ops = [op for op in ("+", ">") if op in model]
    if not ops:
        return None
    if len(ops) > 1:
        raise InvalidRequestError(
            f"the model {model!r} mixes '+' and '>'",
            param="model",
            hint="use a+b, or a>b to order an overlap",
        )
    parts = model.split(ops[0])
    if any(not p.strip() for p in parts):
        raise InvalidRequestError(
            f"the composition {model!r} has an empty part", param="model", hint="name sets as a+b"
        )
    return parts, ops[0]
