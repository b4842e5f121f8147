"""The engines' ledger of expert sets and the load/unload transactions both engines run.

`SetBook` is `expertlib.loading.SetLedger` (the resident sets, the load checks in their order, the
placement in the `SlotPool`) plus what serving adds: pins a user asked for, requests in flight (a set
serving requests is never evicted), loads and unloads in progress, per-set history and the workers'
host cache. Its transactions are written once, against an awaitable `collective_rpc` (`Rpc`): the
offline engine runs them synchronously, the async engine under its lock while requests stream.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertlib.apply import check_against_base
from expertlib.bounds import DEFAULT_FACTOR, WeightBounds, merge_absmax
from expertlib.checkpoint import BaseCheckpoint
from expertlib.errors import EngineError, NotLoadedError, SlotError
from expertlib.loading import OpenedSet, SetLedger, open_expert_set
from expertlib.patch import ExpertSet
from expertlib.slots import Placement, SetRef, SlotPool

if TYPE_CHECKING:
    from expertlib.engine.start import EngineStart

log = logging.getLogger("expertlib.engine")

#: How long one poll of the workers' background load may wait for it while no request runs (about one
#: decode step here: a request arriving meanwhile waits at most that for its first step)
STAGE_WAIT_S = 0.02

#: collective_rpc as both engines call it: (method, args) -> one result per worker, awaitable
Rpc = Callable[[str, tuple], Awaitable[list[Any]]]


class SetBook(SetLedger):
    """Which expert sets the engine holds, in which slots and remap rows, and how to load one."""

    def __init__(self, base: BaseCheckpoint, slots: int, max_sets: int, weight_bound: float = DEFAULT_FACTOR):
        super().__init__(
            SlotPool(base.moe_layers, base.num_experts, slots, max_sets),
            self.check_base,
            # its base statistics come from the workers at start()
            WeightBounds({}, weight_bound),
        )
        self.base = base
        self.user_pins: set[str] = set()
        self.in_flight: Counter[str] = Counter()
        self.unloading: set[str] = set()
        self.history: dict[str, dict[str, float]] = {}  # per set: loads, cache_loads, evictions, load_seconds
        self.paths: dict[str, str] = {}  # every set ever loaded -> its file (names the host cache's entries)
        self.host_cache: dict[str, Any] = {}  # the workers' host cache, as last reported
        self.host_cache_budget: int | None = None  # bytes the workers' host cache may hold (None: as is)
        self.packed_cache_budget: int | None = None  # bytes of disk for packed sets (None: the default)
        self.loading: set[str] = set()  # placed, slots being written: requests wait for the load
        self._tmp = tempfile.TemporaryDirectory(prefix="expertlib-engine-")

    def open(self, source: OpenedSet | ExpertSet | str | Path, name: str | None = None) -> OpenedSet:
        """The set opened (`open_expert_set`) and checked (`SetLedger.check`), with a file the workers
        can read (a set in memory is written to a temporary one). Reads files: off the event loop."""
        opened = self.check(open_expert_set(source, name=name))
        es = opened.expert_set
        if es.path is None:
            es.save(Path(self._tmp.name) / f"{abs(hash((opened.name, opened.digest)))}.safetensors")
        return opened

    def check_base(self, es: ExpertSet) -> None:
        check_against_base(
            es,
            identity=self.base.identity,
            moe_layers=self.base.moe_layers,
            num_experts=self.base.num_experts,
            expert_digest=self.base.expert_digest,
            hint="serve the exact base checkpoint the set was trained on",
            expert_shapes=self.base.expert_shapes,
        )

    def admit(self, opened: OpenedSet, *, pin: bool = False) -> Placement | None:
        if opened.name in self.unloading:
            raise SlotError(
                f"expert set {opened.name!r} is being unloaded", hint="retry once the unload finished"
            )
        placement = super().admit(opened, pin=pin)
        if placement is not None and pin:
            self.user_pins.add(opened.name)
        return placement

    def evicted(self, name: str) -> None:
        self.count(name, "evictions")
        log.info("evicted expert set %s (least recently used) to make room", name)
        super().evicted(name)

    def forget(self, name: str) -> None:
        super().forget(name)
        self.user_pins.discard(name)

    def count(self, name: str, what: str, by: float = 1) -> None:
        h = self.history.setdefault(name, dict(loads=0, cache_loads=0, evictions=0, load_seconds=0.0))
        h[what] += by

    def loaded_from(self, name: str, path: str, seconds: float, cache: dict[str, Any] | None) -> None:
        """Book a finished load: its time, and whether the workers took it from their host cache."""
        hits = (cache or {}).get("hits", 0) - self.host_cache.get("hits", 0)
        self.paths[name] = path
        self.count(name, "loads")
        self.count(name, "load_seconds", seconds)
        if cache is not None:
            self.count(name, "cache_loads", 1 if hits > 0 else 0)
            self.host_cache = cache

    def residency(self, name: str) -> str:
        """Where a set is: "slots" (resident), "host" (host cache of the workers) or "disk"."""
        if name in self.pool:
            return "slots"
        if self.paths.get(name) in set(self.host_cache.get("paths", [])):
            return "host"
        return "disk"

    def stage_args(self, name: str, path: str) -> tuple[str, str, str | None]:
        es = self.sets[name].expert_set
        digest = es.manifest.content_digest  # the worker checks its copy against it
        checked = es.checked.model_dump_json() if es.checked is not None else None  # it trusts this check
        return (path, digest, checked)

    def ref(self, expert_set: SetRef | str | None) -> SetRef | None:
        """The SetRef a request runs with (None or "" = the base), and the set marked recently used.

        A name is resolved here, the one place; a SetRef resolved earlier is checked (still resident,
        the same tensors) and follows its set to a new row if it was evicted and loaded again."""
        if not expert_set:
            return None
        name = expert_set if isinstance(expert_set, str) else expert_set.name
        if name in self.loading:
            raise NotLoadedError(f"expert set {name!r} is being loaded", hint="retry once the load finished")
        if name in self.unloading:
            raise NotLoadedError(f"expert set {name!r} is being unloaded", hint="load it again to use it")
        set_row = self.pool.row_of(name)  # NotLoadedError when it is not resident
        opened = self.sets[name]
        self.pool.touch(name)
        if isinstance(expert_set, str):
            return SetRef(name, opened.digest, set_row, opened.version)
        if expert_set.digest != opened.digest:
            raise NotLoadedError(
                f"expert set {name!r} was replaced by another set of that name after the request named it",
                hint="send the request again",
            )
        return expert_set if expert_set.set_row == set_row else replace(expert_set, set_row=set_row)

    # --- the transactions both engines run (rpc: the engine's collective_rpc, awaitable) ------------

    def use(self, start: EngineStart) -> None:
        """Take the engine's own options once vLLM has started (the host cache is sized from the memory
        free then); `start` hands them to the workers."""
        self.verify_always = start.verify_always
        self.host_cache_budget = start.cache_budget()
        self.packed_cache_budget = start.packed_cache

    async def start(self, rpc: Rpc) -> None:
        """Check the workers' slot layout against this book and size their host cache and packed-set
        disk cache."""
        infos = await rpc("expertlib_info", ())
        _check_worker(infos[0], self.base, self.pool.slots_per_layer, self.pool.max_sets)
        shards = [{(int(layer), str(part)): v for layer, part, v in i["weight_absmax"]} for i in infos]
        # the largest over tensor-parallel shards
        self.bounds = WeightBounds(merge_absmax(shards), self.bounds.factor)
        self.host_cache = (await rpc("expertlib_host_cache", (self.host_cache_budget,)))[0]
        if self.verify_always:
            # every load hashed: slot bytes come from the checked file, never a cache on disk
            await rpc("expertlib_packed_cache", (None, None, False, False))
        elif self.packed_cache_budget is not None:
            await rpc("expertlib_packed_cache", (int(self.packed_cache_budget),))

    async def load(self, opened: OpenedSet, pin: bool, rpc: Rpc, pause=None, idle=None) -> str:
        """Load a set `open` opened and checked: the rest of its checks and its placement (`admit`:
        weight bounds before anything is evicted, the name; slots and a set row reserved, least
        recently used unpinned sets evicted), the workers copy the set in (`_write`) and write its
        row last, the load is booked. If the workers fail, the reservation is undone and the row
        cleared on them, so book and workers agree. `pause`: an awaitable that lets requests run
        while the workers read the set (the async engine); `idle()`: whether no request runs now (a
        poll of the workers may then wait for them a little, `STAGE_WAIT_S`)."""
        name, path = opened.name, str(opened.expert_set.path)
        evicted_rows = {n: self.pool.row_of(n) for n in self.pool.loaded()}
        placement = self.admit(opened, pin=pin)
        if placement is None:  # already resident: touched (and pinned)
            return name
        start = time.perf_counter()
        self.loading.add(name)
        try:
            await self._write(placement, [evicted_rows[n] for n in placement.evicted], path, rpc, pause, idle)
        except Exception:
            if name in self.pool:
                self.pool.release(name)
            self.forget(name)
            with contextlib.suppress(Exception):  # the engine is failing already; the row stays unused
                await rpc("expertlib_apply", ([placement.set_row],))
            raise
        finally:
            self.loading.discard(name)
            cache = None  # the workers' host cache after the load, as unstaging reports it
            with contextlib.suppress(Exception):
                cache = (await rpc("expertlib_unstage", (path,)))[0]
        self.loaded_from(name, path, time.perf_counter() - start, cache)
        return name

    async def _write(
        self, placement: Placement, evicted_rows: list[int], path: str, rpc: Rpc, pause, idle=None
    ) -> None:
        """The workers' side of a load: clear the evicted sets' rows (before their slots are
        overwritten), have the workers read, check and pack the set (or take it from their host
        cache) and copy it into its slots, on a worker thread while steps run when `pause` is given
        (no step is held up by more than a poll), and only then write the set's row, so that no step
        sees it half written."""
        args = self.stage_args(placement.name, path)
        if evicted_rows:
            await rpc("expertlib_apply", (evicted_rows,))
        fills = [[layer, slot, e] for layer, slot, e in placement.fills]
        while True:
            wait = STAGE_WAIT_S if idle is not None and idle() else 0.0
            if all(await rpc("expertlib_stage", (*args, pause is not None, fills, wait))):
                break
            await pause()
        remap = {layer: dict(m) for layer, m in placement.remap.items()}  # expert -> slot
        await rpc("expertlib_apply", ([], None, None, placement.set_row, remap))

    async def prepack(self, opened: OpenedSet, rpc: Rpc, idle: Callable[[], bool], wait) -> dict[str, Any]:
        """Have the workers pack a set `check` passed into their packed-set disk cache ahead of its
        first request, one small piece per call, each called only while `idle()` (`wait` is awaited
        between calls); a set this book holds was written there by its load. Returns what the first
        worker reports: outcome (packed, cached, no room, failed: why) and bytes written."""
        es = opened.expert_set
        checked = es.checked.model_dump_json() if es.checked is not None else None
        args = (str(es.path), es.manifest.content_digest, checked)
        try:
            while True:
                if idle():
                    states = await rpc("expertlib_prepack", args)
                    if all(s["done"] for s in states):
                        break
                await wait()
        finally:
            with contextlib.suppress(Exception):  # the job is dropped; nothing depends on it
                await rpc("expertlib_prepack", (*args, True))
        failed = [s for s in states if s["outcome"] != states[0]["outcome"]]
        return dict(failed[0] if failed else states[0])

    async def unload(self, name: str, rpc: Rpc) -> None:
        """Free a set's slots and row, and clear the row on the workers."""
        await rpc("expertlib_apply", ([self.release(name)],))

    def pin(self, name: str, pinned: bool = True) -> None:
        self.pool.row_of(name)
        (self.user_pins.add if pinned else self.user_pins.discard)(name)
        self.pool.pin(name, pinned or self.in_flight[name] > 0)

    def request_started(self, name: str | None) -> None:
        if name:
            self.in_flight[name] += 1
            self.pool.pin(name, True)  # never evicted while a request uses it

    def request_finished(self, name: str | None) -> None:
        if name:
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]
                if name in self.pool:
                    self.pool.pin(name, name in self.user_pins)

    def status(self) -> dict[str, Any]:
        st = self.pool.status()
        for name, info in st["sets"].items():
            opened = self.sets[name]
            es = opened.expert_set
            info.update(
                pinned=name in self.user_pins,
                in_flight=self.in_flight.get(name, 0),
                task=es.manifest.task,
                content_digest=opened.digest,
                path=str(es.path) if es.path else None,
            )
        st["history"] = {n: dict(h, residency=self.residency(n)) for n, h in self.history.items()}
        st["host_cache"] = {k: v for k, v in self.host_cache.items() if k != "paths"}
        st["base"] = self.base.identity.model_dump()
        st["base_path"] = str(self.base.path)
        st["num_experts"] = self.base.num_experts
        st["moe_layers"] = list(self.base.moe_layers)
        return st


class SetsView:
    """What both engines answer from their book (`_book`, a SetBook)."""

    _book: SetBook

    def ref(self, name: str) -> SetRef:
        """The SetRef of a loaded set (NotLoadedError otherwise): what a request carries to `generate`."""
        ref = self._book.ref(name)
        if ref is None:
            raise NotLoadedError("the base model is not an expert set", hint="pass None for the base")
        return ref

    def loaded_sets(self) -> list[str]:
        return self._book.pool.loaded()

    def status(self) -> dict[str, Any]:
        return self._book.status()


def _check_worker(info: dict[str, Any], base: BaseCheckpoint, slots: int, max_sets: int) -> None:
    want = {
        "num_experts": base.num_experts,
        "slots": slots,
        "max_sets": max_sets,
        "moe_layers": base.moe_layers,
    }
    got = {k: info.get(k) for k in want}
    if got != want:
        raise EngineError(f"the vLLM workers report slot layout {got}, expected {want}")


__all__ = ["Rpc", "SetBook", "SetsView"]
