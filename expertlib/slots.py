"""Expert slots and remap tables: the one mechanism behind training, composing and serving.

Each MoE layer keeps its E checkpoint experts untouched and gets S extra *slots*. An expert set
occupies some slots and one row of the layer's remap table:

    remap[l] : (max_sets + 1, E) int       row 0 = identity (the base model)
    physical_ids = remap[l][set_of_token, top_k_ids]                      # (T, K)

Ids < E compute with the base experts, ids >= E with slot `id - E`. The router is untouched.

Two halves live here:
- `SlotPool`: plain-Python accounting shared by the transformers composer and the vLLM plugin
  (which set sits in which slots, dedup of identical experts by recomputed digest, LRU eviction,
  pinning);
- the transformers side: `install_slots` adds slot tensors and a remap buffer to every experts
  module and swaps in `slot_experts_forward`, which computes base and slot experts with two
  grouped matmuls instead of concatenating weights, so the base is never copied. Training uses
  the same slots as its only trainable parameters.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from expertlib.errors import SlotError
from expertlib.moe import ExpertWeights, expert_views, experts_module, moe_layer_indices

# --- accounting --------------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where `load` put an expert set."""

    name: str
    set_index: int  # row of every layer's remap table
    remap: dict[int, dict[int, int]]  # layer -> {expert: physical id (E + slot)}
    fills: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, slot, expert) to copy now
    evicted: list[str] = field(default_factory=list)


@dataclass
class _Resident:
    set_index: int
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

    def index_of(self, name: str) -> int:
        from expertlib.errors import NotLoadedError

        if name not in self._sets:
            raise NotLoadedError(
                f"expert set {name!r} is not loaded", hint=f"loaded: {self.loaded() or 'none'}"
            )
        return self._sets[name].set_index

    def remap_of(self, name: str) -> dict[int, dict[int, int]]:
        self.index_of(name)
        res = self._sets[name]
        return {layer: {e: self.num_experts + s for e, s in m.items()} for layer, m in res.slots.items()}

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
                    "index": r.set_index,
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
        self.index_of(name)
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
            return Placement(name, self._sets[name].set_index, self.remap_of(name))
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
                why = f"layers {sorted(short)} lack free slots" if short else "no free set index"
                raise SlotError(
                    f"cannot load expert set {name!r}: {why} and every resident set is pinned",
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
        row = self._rows.pop(0)
        self._sets[name] = _Resident(row, slots, pinned)
        return Placement(name, row, self.remap_of(name), fills, evicted)

    def release(self, name: str) -> list[tuple[int, int]]:
        """Forget a set; returns the (layer, slot) pairs that became free."""
        self.index_of(name)
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
        self._rows.append(res.set_index)
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


# --- transformers: slot tensors inside the experts modules ---------------------------------------------


class _ActiveSets:
    """Per-model holder of the set id of each sequence (or one id for all), read by every layer."""

    def __init__(self):
        self.ids: torch.Tensor | int | None = None

    def per_token(self, num_tokens: int, device) -> torch.Tensor | None:
        ids = self.ids
        if ids is None or (isinstance(ids, int) and ids == 0):
            return None
        if isinstance(ids, int):
            return torch.full((num_tokens,), ids, dtype=torch.long, device=device)
        if num_tokens % ids.numel():
            raise SlotError(
                f"{num_tokens} tokens cannot be split over {ids.numel()} sequences' expert-set ids",
                hint="pass one expert set per sequence of the batch (num_return_sequences expands them)",
            )
        return ids.to(device).repeat_interleave(num_tokens // ids.numel())  # (T,)


class _SlotState(nn.Module):
    """Slot tensors (same layout as the fused base tensors) and the remap table of one layer."""

    def __init__(self, ex: nn.Module, num_slots: int, max_sets: int, trainable: bool, active: _ActiveSets):
        super().__init__()
        E = ex.num_experts
        dtype, device = ex.gate_up_proj.dtype, ex.gate_up_proj.device

        def new(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(torch.zeros(num_slots, *t.shape[1:], dtype=dtype, device=device), trainable)

        self.gate_up_proj = new(ex.gate_up_proj)
        self.down_proj = new(ex.down_proj)
        self.has_bias = bool(getattr(ex, "has_bias", False))
        if self.has_bias:
            self.gate_up_proj_bias = new(ex.gate_up_proj_bias)
            self.down_proj_bias = new(ex.down_proj_bias)
        self.is_transposed = bool(getattr(ex, "is_transposed", False))
        self.is_concatenated = bool(getattr(ex, "is_concatenated", True))
        self.num_experts = num_slots
        identity = torch.arange(E, device=device).expand(max_sets + 1, E).clone()
        self.register_buffer("remap", identity, persistent=False)  # (max_sets + 1, E)
        self.active = active

    def views(self, slot: int) -> ExpertWeights:
        return expert_views(self, slot)


def install_slots(
    model: nn.Module, slots_per_layer: int | dict[int, int], max_sets: int = 1, *, trainable: bool = False
) -> None:
    """Give every MoE layer (or those in the dict) slot tensors, a remap table and the slot forward."""
    if hasattr(model, "_expertlib_active"):
        raise SlotError("slots are already installed on this model", hint="call remove_slots(model) first")
    active = _ActiveSets()
    model._expertlib_active = active
    layers = moe_layer_indices(model)
    counts = slots_per_layer if isinstance(slots_per_layer, dict) else dict.fromkeys(layers, slots_per_layer)
    for layer, n in counts.items():
        if n < 1:
            continue
        ex = experts_module(model, layer)
        ex.expertlib_slots = _SlotState(ex, n, max_sets, trainable, active)
        ex.forward = slot_experts_forward.__get__(ex)


def remove_slots(model: nn.Module) -> None:
    for layer in moe_layer_indices(model):
        ex = experts_module(model, layer)
        if hasattr(ex, "expertlib_slots"):
            del ex.expertlib_slots
            del ex.forward
    if hasattr(model, "_expertlib_active"):
        del model._expertlib_active


def _state(model: nn.Module, layer: int) -> _SlotState:
    ex = experts_module(model, layer)
    if not hasattr(ex, "expertlib_slots"):
        raise SlotError(f"layer {layer} has no slots", hint="call install_slots(model, ...) first")
    return ex.expertlib_slots


@torch.no_grad()
def write_slot(model: nn.Module, layer: int, slot: int, weights: ExpertWeights) -> None:
    views = dict(_state(model, layer).views(slot).items())
    for part, t in weights.items():
        views[part].copy_(t.to(views[part].dtype))


def read_slot(model: nn.Module, layer: int, slot: int) -> ExpertWeights:
    return _state(model, layer).views(slot).map(lambda t: t.detach().clone().contiguous())


def set_remap(model: nn.Module, set_index: int, layer: int, mapping: dict[int, int]) -> None:
    """Row `set_index` of layer `layer`: identity, except expert e -> slot mapping[e]."""
    st = _state(model, layer)
    E = st.remap.shape[1]
    row = torch.arange(E, device=st.remap.device)
    for e, slot in mapping.items():
        row[e] = E + slot
    st.remap[set_index] = row


def reset_remap(model: nn.Module, set_index: int) -> None:
    for layer in moe_layer_indices(model):
        ex = experts_module(model, layer)
        if hasattr(ex, "expertlib_slots"):
            set_remap(model, set_index, layer, {})


@contextlib.contextmanager
def active_sets(model: nn.Module, set_ids: int | torch.Tensor | None):
    """Run `model` with set `set_ids` (one int for all sequences, or a (B,) tensor; 0 = base)."""
    active: _ActiveSets = model._expertlib_active
    prev = active.ids
    active.ids = set_ids if set_ids is None or isinstance(set_ids, int) else torch.as_tensor(set_ids).long()
    try:
        yield
    finally:
        active.ids = prev


def slot_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".expertlib_slots." in n]


def slot_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
):
    """Experts forward with remapped ids: base experts and slots as two grouped matmuls."""
    from transformers.integrations.moe import _grouped_linear  # private, pinned via vLLM's range

    st: _SlotState = self.expertlib_slots
    base_forward = type(self).forward
    set_ids = st.active.per_token(hidden_states.shape[0], hidden_states.device)  # (T,) | None
    if set_ids is None:
        return base_forward(self, hidden_states, top_k_index, top_k_weights)
    ids = st.remap[set_ids[:, None], top_k_index]  # (T, K) physical ids
    E, K = self.num_experts, top_k_index.shape[-1]
    if not bool((ids >= E).any()):
        return base_forward(self, hidden_states, top_k_index, top_k_weights)

    flat = ids.reshape(-1)  # (T*K,)
    sorted_ids, perm = torch.sort(flat)
    h = hidden_states[perm // K]  # (T*K, H)
    n_base = int((sorted_ids < E).sum())
    groups = ((self, sorted_ids[:n_base], h[:n_base]), (st, sorted_ids[n_base:] - E, h[n_base:]))

    def project(which: str, inputs):
        outs = []
        for owner, gids, x in inputs:
            if x.shape[0] == 0:
                continue
            w = getattr(owner, which)
            bias = getattr(owner, which + "_bias")[gids] if getattr(owner, "has_bias", False) else None
            counts = torch.bincount(gids, minlength=w.shape[0])
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            outs.append(_grouped_linear(x, w, offs, bias=bias, is_transposed=owner.is_transposed))
        return outs

    up = torch.cat(project("gate_up_proj", groups), 0)  # (T*K, 2I)
    act = self._apply_gate(up)  # (T*K, I)
    act_groups = ((self, groups[0][1], act[:n_base]), (st, groups[1][1], act[n_base:]))
    down = torch.cat(project("down_proj", act_groups), 0)  # (T*K, H)
    down = down * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(down.dtype)
    out = torch.empty_like(down)
    out[perm] = down
    return out.view(-1, K, out.shape[-1]).sum(1).to(hidden_states.dtype)  # (T, H)


__all__ = [
    "Placement",
    "SlotPool",
    "active_sets",
    "install_slots",
    "read_slot",
    "remove_slots",
    "reset_remap",
    "set_remap",
    "slot_experts_forward",
    "slot_parameters",
    "write_slot",
]
