"""Many expert sets in one transformers model, for library use, evaluation and tests.

    composed = compose(base, [math_set, code_set], slots=16, max_sets=8)
    out = composed.generate(input_ids, expert_sets=["math", None, "code"], max_new_tokens=32)

Each sequence of a batch names its expert set (None = the base). The base weights are never
touched: sets live in slots (`expertlib.slots`), resident sets are tracked by a `SlotPool`
(LRU eviction, pinning, identical experts shared by digest). A load runs the serving engines'
checks (`expertlib.loading.SetLedger`): sets with full parameters and a second set under a loaded
name are refused, as the engines refuse them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from expertlib.apply import check_compatible
from expertlib.bounds import DEFAULT_FACTOR, WeightBounds, model_absmax
from expertlib.errors import NotLoadedError
from expertlib.loading import OpenedSet, OpenNamed, SetLedger, open_expert_set
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
        bounds = WeightBounds(model_absmax(model) if weight_bound != float("inf") else {}, weight_bound)
        pool = SlotPool(layers, experts_module(model, layers[0]).num_experts, slots, max_sets)
        install_slots(model, slots, max_sets)
        #: the resident sets and the load checks the engines run too (expertlib.loading)
        self.ledger = SetLedger(
            pool, lambda es: check_compatible(model, es), bounds, on_evict=self._clear_row_of
        )
        self._row_of: dict[str, int] = {}  # set name -> remap row currently written

    @property
    def pool(self) -> SlotPool:
        return self.ledger.pool

    # --- residency -------------------------------------------------------------------------------

    def load(
        self,
        es: ExpertSet | OpenedSet | str | Path,
        name: str | None = None,
        *,
        pin: bool = False,
        open_named: OpenNamed | None = None,
    ) -> str:
        """Put an expert set (a file, an ExpertSet, or a name `open_named` opens) into free slots,
        evicting least recently used unpinned sets if needed; returns its name. The checks are the
        engines' (`expertlib.loading.SetLedger`): a set with full parameters, for another base, with
        changed bytes, NaN/inf or out-of-bound weights is refused, and so is another set under a
        loaded name; the same set again is only touched (and pinned)."""
        opened = self.ledger.check(open_expert_set(es, name=name, open_named=open_named))
        placement = self.ledger.admit(opened, pin=pin)
        if placement is None:
            return opened.name
        for layer, slot, e in placement.fills:
            write_slot(self.model, layer, slot, opened.expert_set.expert(layer, e))
        for layer, mapping in placement.remap.items():
            set_remap(self.model, placement.set_row, layer, mapping)
        self._row_of[opened.name] = placement.set_row
        return opened.name

    def unload(self, name: str) -> None:
        self.ledger.release(name)
        self._clear_row_of(name)

    def pin(self, name: str, pinned: bool = True) -> None:
        self.ledger.pin(name, pinned)

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
    expert_sets: Iterable[ExpertSet | OpenedSet | str | Path] = (),
    *,
    slots: int = 16,
    max_sets: int = 8,
    weight_bound: float = DEFAULT_FACTOR,
    open_named: OpenNamed | None = None,
) -> ComposedModel:
    """Make `model` serve several expert sets at once; loads `expert_sets` (files, ExpertSets, or
    names `open_named` opens) with `ComposedModel.load`'s checks. Sets whose weights exceed
    `weight_bound` x the base experts' max |w| are refused (inf: no check)."""
    composed = ComposedModel(model, slots=slots, max_sets=max_sets, weight_bound=weight_bound)
    for es in expert_sets:
        composed.load(es, open_named=open_named)
    return composed


# --- many sets as one ----------------------------------------------------------------------------------

#: What `compose_sets` does with an expert that several sets replace: refuse, or take the first set's.
Overlap = Literal["refuse", "first"]


def compose_sets(
    sets: Sequence[ExpertSet],
    *,
    task: str | None = None,
    names: Sequence[str] | None = None,
    overlap: Overlap = "refuse",
) -> ExpertSet:
    """One expert set holding the experts of every set in `sets` (their union), as one remap row
    serves them: `model="a+b"` on the server, `expertlib compose` on disk. The experts keep their
    tensors (and digests), so a server holding the parts shares their slots.

    Sets that replace the same (layer, expert) are refused with a CompositionError naming the
    experts, unless `overlap="first"`: the earlier set's expert wins (`model="a>b"`). `names` (default:
    each set's task) name the parts in errors and provenance; `task` defaults to them joined by "+"."""
    from expertlib.errors import CompositionError
    from expertlib.patch import Provenance, pair_key

    if len(sets) < 2:
        raise CompositionError("a composition needs at least two expert sets", hint="name them as a+b")
    names = list(names or [es.manifest.task for es in sets])
    seen: dict[str, str] = {}
    for name, es in zip(names, sets, strict=True):
        m = es.manifest
        if m.content_digest in seen:
            raise CompositionError(
                f"{name!r} and {seen[m.content_digest]!r} are the same expert set: a set composed with itself",
                hint="name each set once",
            )
        seen[m.content_digest] = name
        if m.extra_params:
            raise CompositionError(
                f"{name!r} carries full parameters {sorted(m.extra_params)[:3]}; only routed experts compose",
                hint="compose sets that replace routed experts only",
            )
        if not m.base.same_base(sets[0].manifest.base):
            raise CompositionError(
                f"{name!r} was trained on another base ({m.base.name}) than {names[0]!r} ({sets[0].manifest.base.name})",
                hint="compose sets of one base",
            )
    owners: dict[tuple[int, int], list[str]] = {}
    for name, es in zip(names, sets, strict=True):
        for pair in es.manifest.pairs():
            owners.setdefault(pair, []).append(name)
    conflicts = [(layer, e, who) for (layer, e), who in sorted(owners.items()) if len(who) > 1]
    if conflicts and overlap != "first":
        shown = ", ".join(
            f"layer {layer} expert {e} ({' and '.join(who)})" for layer, e, who in conflicts[:8]
        )
        more = f" and {len(conflicts) - 8} more" if len(conflicts) > 8 else ""
        raise CompositionError(
            f"the sets replace the same experts: {shown}{more}",
            conflicts=conflicts,
            hint="compose sets that replace different experts, or give an order with '>' (a>b: a's experts win)",
        )
    experts, base_digests = {}, {}
    for name, es in zip(names, sets, strict=True):
        m = es.manifest
        for pair in m.pairs():
            if owners[pair][0] == name and pair not in experts:
                experts[pair] = es.expert(*pair)
                base_digests[pair] = m.base_expert_digests[pair_key(*pair)]
    first = sets[0].manifest
    parts = [
        {"task": es.manifest.task, "name": n, "content_digest": es.manifest.content_digest}
        for n, es in zip(names, sets, strict=True)
    ]
    return ExpertSet.build(
        task=task or "+".join(names),
        base=first.base,
        experts=experts,
        base_digests=base_digests,
        provenance=Provenance(
            method="composed",
            extra={"parts": parts, "overlap": overlap},
            **_composed_profile([es.manifest.provenance for es in sets]),
        ),
        description="composition of " + ", ".join(names),
        dtype=getattr(torch, first.dtype),
    )


def _composed_profile(parts: Sequence) -> dict:
    """A composition's routing profile for `model="auto"`: the token-weighted mixture of its parts'
    (`expertlib.profile.mixture`), when every part has one; and the union of their base anchors."""
    from expertlib.profile import mixture

    anchors = {name: prof for p in parts for name, prof in p.base_anchors.items()}
    profiles = [p.routing_profile for p in parts]
    if any(prof is None for prof in profiles):
        return {"base_anchors": anchors}
    return {"routing_profile": mixture(profiles), "base_anchors": anchors}
