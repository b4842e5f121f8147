"""Apply an expert set to a loaded model in place (and revert exactly), or extract one.

In-place application is the simple, one-task-at-a-time path (evaluation, export, tests).
Serving many sets at once goes through slots (`expertlib.slots`), which never touch the base.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from expertlib.errors import BaseMismatchError, PatchShapeError
from expertlib.identity import BaseIdentity, base_identity
from expertlib.moe import (
    experts_module,
    iter_experts,
    moe_layer_indices,
    read_expert,
    tensor_digest,
    write_expert,
)
from expertlib.patch import ExpertSet, Provenance, pair_key


def check_against_base(
    es: ExpertSet,
    *,
    identity: BaseIdentity,
    moe_layers: Iterable[int],
    num_experts: int,
    expert_digest: Callable[[int, int], str] | None,
    hint: str,
    expert_shapes: Mapping[str, Iterable[int]] | None = None,
) -> None:
    """Refuse a set made for another base: config identity, layer and expert ids, expert shapes
    (`expert_shapes`: canonical part -> shape of one base expert), then (unless `expert_digest` is
    None) the digests of exactly the base experts the set replaces.

    Shared by in-place application (a loaded model) and the serving engine (a lazy checkpoint)."""
    m = es.manifest
    where = str(es.path) if es.path else None
    if not identity.same_base(m.base):
        raise BaseMismatchError(
            f"expert set {m.task!r} was made for a {m.base.model_type} base {m.base.name or ''} "
            f"({m.base.config_digest[:19]}...), this base is {identity.model_type} {identity.name or ''} "
            f"({identity.config_digest[:19]}...)",
            path=where,
            hint="use the base model the set was trained on, or retrain the set on this base",
        )
    moe = set(moe_layers)
    for layer, ids in m.experts.items():
        if layer not in moe:
            raise PatchShapeError(
                f"layer {layer} is not a MoE layer of this model (those: {sorted(moe)})", path=where
            )
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise PatchShapeError(
                f"layer {layer}: expert ids {bad} out of range (0..{num_experts - 1})", path=where
            )
    if expert_shapes is not None:
        want = {part: list(shape) for part, shape in expert_shapes.items()}
        if m.experts and m.expert_shapes != want:
            raise PatchShapeError(
                f"expert set {m.task!r} has expert shapes {m.expert_shapes}, this base's experts are {want}",
                path=where,
                hint="the set was not made for this base model; re-export it from a model of this base",
            )
    if expert_digest is None:
        return
    for layer, e in m.pairs():
        if expert_digest(layer, e) != m.base_expert_digests[pair_key(layer, e)]:
            raise BaseMismatchError(
                f"expert {e} of layer {layer} differs from the base expert set {m.task!r} was made for "
                "(same architecture and config, other weights)",
                path=where,
                hint=hint,
            )


def check_compatible(model: nn.Module, es: ExpertSet, *, check_weights: bool = True) -> None:
    """Refuse a set made for another base (see `check_against_base`), and for sets that carry full
    parameters, a base whose replaced parameters differ."""
    m = es.manifest
    where = str(es.path) if es.path else None
    layers = moe_layer_indices(model)
    check_against_base(
        es,
        identity=base_identity(model),
        moe_layers=layers,
        num_experts=experts_module(model, layers[0]).num_experts,
        expert_shapes={part: t.shape for part, t in read_expert(model, layers[0], 0).items()},
        expert_digest=(lambda layer, e: read_expert(model, layer, e).digest()) if check_weights else None,
        hint="use the exact base checkpoint the set was trained on; revert any set applied in place first",
    )
    if not check_weights:
        return
    params = dict(model.named_parameters())
    for name, digest in m.base_param_digests.items():
        if name not in params or tensor_digest(params[name]) != digest:
            raise BaseMismatchError(
                f"parameter {name!r} differs from the base expert set {m.task!r} was made for",
                path=where,
                hint="use the exact base checkpoint the set was trained on",
            )


class AppliedExpertSet:
    """Handle returned by `apply_expert_set`; `revert()` restores the replaced weights bit-exactly."""

    def __init__(self, model: nn.Module, es: ExpertSet, saved: dict, saved_params: dict):
        self.model, self.expert_set = model, es
        self._saved, self._saved_params = saved, saved_params
        self.reverted = False

    def revert(self) -> None:
        if self.reverted:
            return
        for (layer, e), w in self._saved.items():
            write_expert(self.model, layer, e, w)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in self._saved_params.items():
                params[name].copy_(t)
        self.reverted = True

    def __enter__(self) -> AppliedExpertSet:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def apply_expert_set(
    model: nn.Module, es: ExpertSet, *, check_base: bool = True, verify: bool = True
) -> AppliedExpertSet:
    """Write the set's experts (and extra params) into `model` in place; returns a revert handle.

    `verify` (default) recomputes the set's digests and refuses NaN/inf first (`ExpertSet.verify`);
    turn it off only for files you wrote yourself."""
    check_compatible(model, es, check_weights=check_base)
    if verify:
        es.verify()
    params = dict(model.named_parameters())
    extra = es.extra_params()
    for name, t in extra.items():
        if name not in params or tuple(params[name].shape) != tuple(t.shape):
            raise PatchShapeError(
                f"parameter {name!r} with shape {tuple(t.shape)} does not exist in this model"
            )
    saved = {(layer, e): read_expert(model, layer, e) for layer, e in es.manifest.pairs()}
    saved_params = {name: params[name].detach().clone() for name in extra}
    for (layer, e), w in es.experts():
        write_expert(model, layer, e, w)
    with torch.no_grad():
        for name, t in extra.items():
            params[name].copy_(t.to(params[name].dtype))
    return AppliedExpertSet(model, es, saved, saved_params)


def changed_experts(base: nn.Module, tuned: nn.Module) -> dict[int, list[int]]:
    """Routed experts whose weights differ (any bit) between two models of the same architecture."""
    out: dict[int, list[int]] = {}
    for layer, e in iter_experts(base):
        if not read_expert(base, layer, e).equal(read_expert(tuned, layer, e)):
            out.setdefault(layer, []).append(e)
    return out


def extract_expert_set(
    tuned: nn.Module,
    base: nn.Module | Mapping[tuple[int, int], str],
    *,
    task: str,
    experts: Mapping[int, Iterable[int]] | None = None,
    base_identity_: BaseIdentity | None = None,
    extra_param_names: Iterable[str] = (),
    provenance: Provenance | None = None,
    description: str = "",
) -> ExpertSet:
    """Cut an expert set out of a fine-tuned model.

    `base` is the untouched base model, or a mapping (layer, expert) -> base expert digest.
    `experts` is the expert map to extract; None finds every expert that differs from `base`
    (which then must be a model).
    """
    if experts is None:
        if not isinstance(base, nn.Module):
            raise TypeError("finding changed experts needs the base model, not just its digests")
        experts = changed_experts(base, tuned)
        if not experts:
            raise PatchShapeError("no routed expert differs from the base", hint="was the model fine-tuned?")
    pairs = [(int(layer), int(e)) for layer, ids in experts.items() for e in ids]
    if isinstance(base, nn.Module):
        base_digests = {p: read_expert(base, *p).digest() for p in pairs}
        base_params = dict(base.named_parameters())
        param_digests = {n: tensor_digest(base_params[n]) for n in extra_param_names}
    else:
        base_digests = dict(base)
        param_digests = {}
    tuned_params = dict(tuned.named_parameters())
    return ExpertSet.build(
        task=task,
        base=base_identity_ or base_identity(base if isinstance(base, nn.Module) else tuned),
        experts={p: read_expert(tuned, *p) for p in pairs},
        base_digests=base_digests,
        extra_params={n: tuned_params[n] for n in extra_param_names},
        base_param_digests=param_digests,
        provenance=provenance or Provenance(method="extracted"),
        description=description,
    )
