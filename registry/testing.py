"""Small expert sets built in code, for tests and examples of the registry (no model needed)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from expertlib.identity import BaseIdentity, base_identity
from expertlib.moe import ExpertWeights
from expertlib.patch import ExpertSet, Provenance


def tiny_base_identity(model_type: str = "qwen2_moe", name: str | None = None, **overrides) -> BaseIdentity:
    """Identity of `expertlib.testing.tiny_config(model_type)` (config only, no weights)."""
    from expertlib.testing import tiny_config

    return base_identity(tiny_config(model_type, **overrides), name=name or f"tiny-{model_type}")


def make_expert_set(
    task: str,
    base: BaseIdentity,
    experts: Mapping[int, list[int]],
    *,
    seed: int = 0,
    hidden: int = 64,
    inter: int = 32,
    fill: Callable[[int, int], ExpertWeights] | None = None,
    description: str = "",
    base_digests: Mapping[tuple[int, int], str] | None = None,
) -> ExpertSet:
    """An expert set replacing `experts` ({layer: ids}); weights random (seeded) or `fill(layer, e)`."""
    g = torch.Generator().manual_seed(seed)

    def rand(layer: int, e: int) -> ExpertWeights:
        return ExpertWeights(
            gate=torch.randn(inter, hidden, generator=g),
            up=torch.randn(inter, hidden, generator=g),
            down=torch.randn(hidden, inter, generator=g),
        )

    make = fill or rand
    weights = {(layer, e): make(layer, e) for layer, ids in sorted(experts.items()) for e in ids}
    return ExpertSet.build(
        task=task,
        base=base,
        experts=weights,
        base_digests=dict(base_digests)
        if base_digests
        else {k: f"sha256:{'0' * 63}{k[1] % 10}" for k in weights},
        provenance=Provenance(method="manual"),
        description=description,
    )


def write_expert_set(path: str | Path, *args, **kwargs) -> Path:
    """`make_expert_set(...)` saved to `path`."""
    return make_expert_set(*args, **kwargs).save(path)
