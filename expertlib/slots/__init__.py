"""Expert slots and remap tables: the one mechanism behind training, composing and serving.

Each MoE layer keeps its E checkpoint experts untouched and gets S extra *slots*. An expert set
occupies some slots and one row of the layer's remap table, its *set row*:

    remap[l] : (max_sets + 1, E) int       row 0 = identity (the base model)
    physical_ids = remap[l][set_row_of_token, top_k_ids]                  # (T, K)

Ids < E compute with the base experts, ids >= E with slot `id - E`. The router is untouched.
Every Python API speaks in slot indices (`Placement.remap`, `set_remap`, the vLLM workers'
`expertlib_set_row`: expert -> slot); only the tables the kernels read hold physical ids E + slot.

One file per part, PEFT-style:
- `pool.py`: `SlotPool`, the backend-neutral accounting (which set sits in which slots and set
  row, dedup of identical experts by recomputed digest, LRU eviction, pinning) and `SetRef`, the
  value a request carries once its set name is resolved;
- `hf.py`: the transformers backend (`install_slots`, `slot_experts_forward`, `set_remap`, ...),
  used by `expertlib.compose` and by training;
- the vLLM backend lives in `expertlib.vllm_plugin` (an entry point vLLM imports in every process
  it starts): slot-carrying model classes, the remapping router, per-token set rows and the
  workers' hot load/unload; `expertlib.engine` drives it with a `SlotPool`.
"""

from expertlib.slots.hf import (
    active_sets,
    install_slots,
    read_slot,
    remove_slots,
    reset_remap,
    set_remap,
    slot_experts_forward,
    slot_parameters,
    write_slot,
)
from expertlib.slots.pool import Placement, SetRef, SlotPool

__all__ = [
    "Placement",
    "SetRef",
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
