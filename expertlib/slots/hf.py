"""The transformers backend of expert slots: slot tensors and a remap buffer inside each experts module.

`install_slots` adds slot tensors (same layout as the fused base tensors) and a remap table to every
experts module and swaps in `slot_experts_forward`, which computes base and slot experts with two
grouped matmuls instead of concatenating weights, so the base is never copied. `compose` serves many
sets with it; training uses the same slots as its only trainable parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from expertlib.errors import SlotError
from expertlib.moe import ExpertWeights, expert_views, experts_module, moe_layer_indices

# --- transformers: slot tensors inside the experts modules ---------------------------------------------


class _ActiveSets:
    """Per-model holder of the set row of each sequence (or one row for all), read by every layer."""

    def __init__(self):
        self.set_rows: torch.Tensor | int | None = None

    def per_token(self, num_tokens: int, device) -> torch.Tensor | None:
        set_rows = self.set_rows
        if set_rows is None or (isinstance(set_rows, int) and set_rows == 0):
            return None
        if isinstance(set_rows, int):
            return torch.full((num_tokens,), set_rows, dtype=torch.long, device=device)
        if num_tokens % set_rows.numel():
            raise SlotError(
                f"{num_tokens} tokens cannot be split over {set_rows.numel()} sequences' set rows",
                hint="pass one expert set per sequence of the batch (num_return_sequences expands them)",
            )
        return set_rows.to(device).repeat_interleave(num_tokens // set_rows.numel())  # (T,)


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


def set_remap(model: nn.Module, set_row: int, layer: int, mapping: dict[int, int]) -> None:
    """Set row `set_row` of layer `layer`: identity, except expert e -> slot mapping[e] (a slot
    index, as in `Placement.remap`; the table stores the physical id E + slot)."""
    st = _state(model, layer)
    E = st.remap.shape[1]
    row = torch.arange(E, device=st.remap.device)
    for e, slot in mapping.items():
        row[e] = E + slot
    st.remap[set_row] = row


def reset_remap(model: nn.Module, set_row: int) -> None:
    for layer in moe_layer_indices(model):
        ex = experts_module(model, layer)
        if hasattr(ex, "expertlib_slots"):
            set_remap(model, set_row, layer, {})


@contextlib.contextmanager
def active_sets(model: nn.Module, set_rows: int | torch.Tensor | None):
    """Run `model` with set rows `set_rows` (one int for all sequences, or a (B,) tensor; 0 = base)."""
    active: _ActiveSets = model._expertlib_active
    prev = active.set_rows
    rows = set_rows if set_rows is None or isinstance(set_rows, int) else torch.as_tensor(set_rows).long()
    active.set_rows = rows
    try:
        yield
    finally:
        active.set_rows = prev


def slot_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".expertlib_slots." in n]


def slot_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
):
    """Experts forward with remapped ids: base experts and slots as two grouped matmuls."""
    from transformers.integrations.moe import _grouped_linear  # private, pinned via vLLM's range

    st: _SlotState = self.expertlib_slots
    base_forward = type(self).forward
    set_rows = st.active.per_token(hidden_states.shape[0], hidden_states.device)  # (T,) | None
    if set_rows is None:
        return base_forward(self, hidden_states, top_k_index, top_k_weights)
    ids = st.remap[set_rows[:, None], top_k_index]  # (T, K) physical ids
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
