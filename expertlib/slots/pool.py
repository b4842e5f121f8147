"""The backend-neutral half of expert slots: which expert set occupies which slots and remap row.

`SlotPool` is plain Python (no tensors): placement, dedup of identical experts by recomputed digest,
LRU eviction and pinning; `SetRef`, the value a request carries once its set is resolved. The
transformers backend (`expertlib.slots.hf`, via `compose`) and the vLLM
backend (`expertlib.vllm_plugin`, via `expertlib.engine`) both ask it where a set goes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from expertlib.errors import NotLoadedError, SlotError, SlotsBusyError

# --- accounting --------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where `load` put an expert set."""

    name: str
    set_row: int  # the set's row of every layer's remap table (0 is the base)
    remap: dict[int, dict[int, int]]  # layer -> {expert: slot}
    fills: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, slot, expert) to copy now
    evicted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SetRef:
    """One resident expert set as a request carries it, resolved once from the name the request gave
    (vLLM's `LoRARequest` plays this part for adapters) and then passed as a value down to the engine,
    which checks it (still resident, same tensors) instead of looking the name up again.

    `digest` is the content digest of the tensors loaded under `name`, `set_row` the set's row of the
    remap tables, `version` the registry version it was loaded from (None for a bare patch file or an
    in-memory set)."""

    name: str
    digest: str
    set_row: int
    version: int | None = None

    @property
    def cache_salt(self) -> str:
        """vLLM's prefix-cache salt for the set's requests: KV blocks computed under one set are never
        reused by a request for another (the experts change every later key and value); sets with
        identical tensors share blocks."""
        return f"expertlib:{self.digest}"


@dataclass
class _Resident:
    set_row: int
    slots: dict[int, dict[int, int]]  # layer -> {expert: slot}
    pinned: bool = False


class SlotPool:
    """Which expert set occupies which slots. No tensors: both engines share this logic."""

    def __init__(self, moe_layers: list[int], num_experts: int, slots_per_layer: int, max_sets: int):
        if slots_per_layer < 1 or max_sets < 1:
            raise SlotError("slots_per_layer and max_sets must be >= 1")
        self.moe_layers = list(moe_layers)
        self.num_experts = num_experts
        self.slots_per_layer = slots_per_layer
        self.max_sets = max_sets
        self._free = {layer: list(range(slots_per_layer)) for layer in self.moe_layers}
        self._digest: dict[tuple[int, int], str] = {}  # (layer, slot) -> digest held there
        self._refs: dict[tuple[int, int], set[str]] = {}  # (layer, slot) -> sets using it
        self._rows = list(range(1, max_sets + 1))
        self._sets: OrderedDict[str, _Resident] = OrderedDict()  # LRU order: oldest first

    # queries
    def loaded(self) -> list[str]:
        return list(self._sets)

    def __contains__(self, name: str) -> bool:
        return name in self._sets

    def row_of(self, name: str) -> int:
        """The set row of a resident set; NotLoadedError otherwise."""
        if name not in self._sets:
            raise NotLoadedError(
                f"expert set {name!r} is not loaded", hint=f"loaded: {self.loaded() or 'none'}"
            )
        return self._sets[name].set_row

    def remap_of(self, name: str) -> dict[int, dict[int, int]]:
        """layer -> {expert: slot} of a resident set."""
        self.row_of(name)
        return {layer: dict(m) for layer, m in self._sets[name].slots.items()}

    def status(self) -> dict:
        used = {layer: self.slots_per_layer - len(free) for layer, free in self._free.items()}
        return {
            "slots_per_layer": self.slots_per_layer,
            "max_sets": self.max_sets,
            "slots_used": used,
            "slots_used_total": sum(used.values()),
            "slots_total": self.slots_per_layer * len(self.moe_layers),
            "sets": {
                n: {
                    "set_row": r.set_row,
                    "pinned": r.pinned,
                    "experts": sum(len(m) for m in r.slots.values()),
                }
                for n, r in self._sets.items()
            },
            "lru_order": list(self._sets),
        }

    # updates
    def touch(self, name: str) -> None:
        if name in self._sets:
            self._sets.move_to_end(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        self.row_of(name)
        self._sets[name].pinned = pinned

    def place(
        self,
        name: str,
        expert_map: dict[int, list[int]],
        expert_digests: dict[str, str],
        *,
        pinned: bool = False,
    ) -> Placement:
        """Reserve slots and a remap row for a set, evicting LRU unpinned sets if needed.

        Experts with equal digests share a slot, so `expert_digests` must be recomputed from the
        tensors (`ExpertSet.verify()`), never a manifest's claims: a forged digest would otherwise
        serve one set's weights to another. Experts without a digest never share."""
        if name in self._sets:
            self.touch(name)
            if pinned:
                self._sets[name].pinned = True
            return Placement(name, self._sets[name].set_row, self.remap_of(name))
        for layer, ids in expert_map.items():
            if layer not in self._free:
                raise SlotError(f"expert set {name!r}: layer {layer} is not a MoE layer ({self.moe_layers})")
            if any(not 0 <= e < self.num_experts for e in ids):
                raise SlotError(f"expert set {name!r}: expert ids {ids} out of range in layer {layer}")
            if len(ids) > self.slots_per_layer:
                raise SlotError(
                    f"expert set {name!r} replaces {len(ids)} experts in layer {layer}, but each layer has "
                    f"only {self.slots_per_layer} slots",
                    hint=f"start the engine with at least {len(ids)} slots per layer",
                )
        evicted: list[str] = []
        while True:
            short = self._shortfall(expert_map, expert_digests)
            if not short and self._rows:
                break
            victim = next((n for n, r in self._sets.items() if not r.pinned), None)
            if victim is None:
                why = f"layers {sorted(short)} lack free slots" if short else "no free set row"
                raise SlotsBusyError(
                    f"cannot load expert set {name!r}: {why} and every resident set is pinned or serving requests",
                    hint="unpin or unload a set, or start with more --slots / --max-sets",
                )
            self.release(victim)
            evicted.append(victim)
        slots: dict[int, dict[int, int]] = {}
        fills: list[tuple[int, int, int]] = []
        for layer, ids in sorted(expert_map.items()):
            for e in ids:
                digest = expert_digests.get(f"{layer}.{e}")
                slot = self._shared_slot(layer, digest)
                if slot is None:
                    slot = self._free[layer].pop(0)
                    self._digest[(layer, slot)] = digest
                    fills.append((layer, slot, e))
                self._refs.setdefault((layer, slot), set()).add(name)
                slots.setdefault(layer, {})[e] = slot
        set_row = self._rows.pop(0)
        self._sets[name] = _Resident(set_row, slots, pinned)
        return Placement(name, set_row, self.remap_of(name), fills, evicted)

    def release(self, name: str) -> list[tuple[int, int]]:
        """Forget a set; returns the (layer, slot) pairs that became free."""
        self.row_of(name)
        res = self._sets.pop(name)
        freed = []
        for layer, m in res.slots.items():
            for slot in set(m.values()):
                refs = self._refs[(layer, slot)]
                refs.discard(name)
                if not refs:
                    del self._refs[(layer, slot)]
                    self._digest.pop((layer, slot), None)
                    self._free[layer].append(slot)
                    freed.append((layer, slot))
            self._free[layer].sort()
        self._rows.append(res.set_row)
        self._rows.sort()
        return freed

    def _shared_slot(self, layer: int, digest: str | None) -> int | None:
        if digest is None:
            return None
        for (lay, slot), d in self._digest.items():
            if lay == layer and d == digest:
                return slot
        return None

    def _shortfall(self, expert_map: dict[int, list[int]], digests: dict[str, str]) -> set[int]:
        short = set()
        for layer, ids in expert_map.items():
            seen: set[str] = set()
            need = 0
            for e in ids:
                d = digests.get(f"{layer}.{e}")
                if d is not None and (d in seen or self._shared_slot(layer, d) is not None):
                    continue
                need += 1
                if d is not None:
                    seen.add(d)
            if need > len(self._free[layer]):
                short.add(layer)
        return short


__all__ = ["Placement", "SetRef", "SlotPool"]
