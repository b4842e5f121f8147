"""Many expert sets in one transformers model, for library use, evaluation and tests.

    composed = compose(base, [math_set, code_set], slots=16, max_sets=8)
    out = composed.generate(input_ids, expert_sets=["math", None, "code"], max_new_tokens=32)

Each sequence of a batch names its expert set (None = the base). The base weights are never
touched: sets live in slots (`expertlib.slots`), resident sets are tracked by a `SlotPool`
(LRU eviction, pinning, identical experts shared by digest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from expertlib.apply import check_compatible
from expertlib.bounds import DEFAULT_FACTOR, WeightBounds, check_bounds, model_absmax, set_absmax
from expertlib.errors import NotLoadedError
from expertlib.moe import experts_module, moe_layer_indices
from expertlib.patch import ExpertSet
from expertlib.slots import SlotPool, active_sets, install_slots, reset_remap, set_remap, write_slot


class ComposedModel:
    """A base MoE model with an expert-slot pool; see `compose`."""

    def __init__(
        self, model: nn.Module, *, slots: int = 16, max_sets: int = 8, weight_bound: float = DEFAULT_FACTOR
    ):
        layers = moe_layer_indices(model)
        self.model = model
        # from the base's own experts, before slots exist (expertlib.bounds)
        self.bounds = WeightBounds(model_absmax(model) if weight_bound != float("inf") else {}, weight_bound)
        self.pool = SlotPool(layers, experts_module(model, layers[0]).num_experts, slots, max_sets)
        install_slots(model, slots, max_sets)
        self._row_of: dict[str, int] = {}  # set name -> remap row currently written

    # --- residency -------------------------------------------------------------------------------

    def load(self, es: ExpertSet | str | Path, name: str | None = None, *, pin: bool = False) -> str:
        """Put an expert set into free slots (evicting LRU unpinned sets if needed); returns its name."""
        if not isinstance(es, ExpertSet):
            es = ExpertSet.open(es)
        name = name or es.manifest.task
        if name in self.pool:
            self.pool.touch(name)
            if pin:
                self.pool.pin(name)
            return name
        check_compatible(self.model, es)
        m = es.manifest
        # digests recomputed from the tensors (NaN/inf refused): slots are shared only on those
        digests = es.verify()
        check_bounds(set_absmax(es), self.bounds, name=name)  # before anything is evicted
        placement = self.pool.place(name, m.experts, digests, pinned=pin)
        for victim in placement.evicted:
            self._clear_row_of(victim)
        for layer, slot, e in placement.fills:
            write_slot(self.model, layer, slot, es.expert(layer, e))
        for layer, mapping in placement.remap.items():
            set_remap(self.model, placement.set_row, layer, mapping)
        self._row_of[name] = placement.set_row
        return name

    def unload(self, name: str) -> None:
        self.pool.release(name)
        self._clear_row_of(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        self.pool.pin(name, pinned)

    def loaded(self) -> list[str]:
        return self.pool.loaded()

    def status(self) -> dict:
        return self.pool.status()

    def _clear_row_of(self, name: str) -> None:
        row = self._row_of.pop(name, None)
        if row is not None:
            reset_remap(self.model, row)

    # --- running -----------------------------------------------------------------------------------

    def set_rows(self, expert_sets: str | None | Sequence[str | None], batch: int) -> torch.Tensor:
        """(B,) set row per sequence; raises NotLoadedError for a name that is not resident."""
        names = (
            [expert_sets] * batch
            if expert_sets is None or isinstance(expert_sets, str)
            else list(expert_sets)
        )
        if len(names) != batch:
            raise ValueError(f"{len(names)} expert sets for a batch of {batch} sequences")
        set_rows = []
        for n in names:
            if n is None:
                set_rows.append(0)
                continue
            if n not in self.pool:
                raise NotLoadedError(
                    f"expert set {n!r} is not loaded", hint=f"loaded: {self.loaded() or 'none'}"
                )
            self.pool.touch(n)
            set_rows.append(self.pool.row_of(n))
        return torch.tensor(set_rows, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, *, expert_sets=None, **kwargs):
        with active_sets(self.model, self.set_rows(expert_sets, input_ids.shape[0])):
            return self.model(input_ids=input_ids, **kwargs)

    forward = __call__

    def generate(self, input_ids: torch.Tensor, *, expert_sets=None, **kwargs):
        set_rows = self.set_rows(expert_sets, input_ids.shape[0])
        n = int(kwargs.get("num_return_sequences", 1) or 1)
        if n > 1:
            set_rows = set_rows.repeat_interleave(n)
        with active_sets(self.model, set_rows):
            return self.model.generate(input_ids=input_ids, **kwargs)


def compose(
    model: nn.Module,
    expert_sets: Iterable[ExpertSet | str | Path] = (),
    *,
    slots: int = 16,
    max_sets: int = 8,
    weight_bound: float = DEFAULT_FACTOR,
) -> ComposedModel:
    """Make `model` serve several expert sets at once; loads `expert_sets` (files or ExpertSets).
    Sets whose weights exceed `weight_bound` x the base experts' max |w| are refused (inf: no check)."""
    composed = ComposedModel(model, slots=slots, max_sets=max_sets, weight_bound=weight_bound)
    for es in expert_sets:
        composed.load(es)
    return composed
