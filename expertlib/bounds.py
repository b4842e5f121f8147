"""Weight bounds: an expert set's weights must lie within reach of the base experts' own range.

A set whose expert weights are finite but huge (1e30) passes every digest and finiteness check, yet
its activations overflow to inf and NaN as soon as a token is routed to it. Such sets are refused
when they enter a model: every expert tensor of a set must satisfy

    max |w|  <=  factor x  max |w| over the base's routed experts of the same layer and part

where the parts are `gate_up` (the gate and up projections: one fused tensor in vLLM), `down`, and
their biases. The base's maxima are computed once, from the base weights, when an engine or a
composer starts. `factor` is `DEFAULT_FACTOR` unless the admin chooses another
(`expertlib serve --weight-bound`, `ExpertEngine(weight_bound=...)`, `compose(weight_bound=...)`);
`inf` turns the check off.

Why 256: ESFT training barely moves the maxima (trained sets stay near 1x of the base's maxima in
their layer and part; `set_absmax` against `model_absmax` measures any set); the tests' synthetic sets
(Gaussian noise of std up to 2.0 on a tiny base) reach about a hundred times. A set of 1e30 weights
is ~1e31x. What the bound cannot promise, the serving engine contains:
the MoE output of every token served by a set is made finite (`expertlib.vllm_plugin.routing`).

The functions are pure, so the check can run on what a load path already has: `tensor_absmax`
computes max |w| per tensor (`ExpertSet.verify` records the same numbers in its scan) and
`check_bounds` compares them with a `WeightBounds`.

    bounds = WeightBounds(model_absmax(model), factor=256)
    check_bounds(set_absmax(es), bounds, name="math")       # WeightBoundError when out of range
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from expertlib.constants import EXPERT_KEY
from expertlib.errors import WeightBoundError

#: Default factor over the base experts' largest |w| (see the module docstring for the measurements).
DEFAULT_FACTOR = 256.0

#: Canonical expert part -> the part the bound is taken over (vLLM fuses gate and up into w13).
PART_GROUPS = {
    "gate": "gate_up",
    "up": "gate_up",
    "down": "down",
    "gate_bias": "gate_up_bias",
    "up_bias": "gate_up_bias",
    "down_bias": "down_bias",
}

#: An expert tensor's name (`EXPERT_KEY`) -> layer, expert, part (fullmatch)
_EXPERT_NAME = re.compile(
    EXPERT_KEY.replace(".", r"\.").format(layer=r"(\d+)", expert=r"(\d+)", part=r"(\w+)")
)

#: (layer, part group) -> max |w| over the base's routed experts of that layer
BaseAbsmax = Mapping[tuple[int, str], float]


def absmax(t: torch.Tensor) -> float:
    """max |w| of a tensor without a temporary of its size (NaN when it holds a NaN)."""
    if t.numel() == 0 or not t.is_floating_point():
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def tensor_absmax(tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Tensor name -> max |w| (what `ExpertSet.verify`'s scan records)."""
    return {name: absmax(t) for name, t in tensors.items()}


def set_absmax(es) -> dict[str, float]:
    """Max |w| per tensor of an ExpertSet: from its verify() scan when it has one, else computed."""
    scan = getattr(es, "scan", None)
    found = getattr(scan, "absmax", None)
    return dict(found) if found else tensor_absmax(es.tensors)


def merge_absmax(parts: Iterable[BaseAbsmax]) -> dict[tuple[int, str], float]:
    """Elementwise max of several statistics (e.g. one per tensor-parallel shard)."""
    out: dict[tuple[int, str], float] = {}
    for stats in parts:
        for key, v in stats.items():
            out[key] = max(out.get(key, 0.0), float(v))
    return out


def model_absmax(model) -> dict[tuple[int, str], float]:
    """The base statistics of a transformers MoE model, from its fused expert parameters (base rows
    only: read before slots are installed)."""
    from expertlib.moe import experts_module, moe_layer_indices

    out: dict[tuple[int, str], float] = {}
    for layer in moe_layer_indices(model):
        ex = experts_module(model, layer)
        n = ex.num_experts
        for group, name in (
            ("gate_up", "gate_up_proj"),
            ("down", "down_proj"),
            ("gate_up_bias", "gate_up_proj_bias"),
            ("down_bias", "down_proj_bias"),
        ):
            t = getattr(ex, name, None)
            if isinstance(t, torch.Tensor):
                out[(layer, group)] = absmax(t[:n])
    return out


@dataclass(frozen=True)
class WeightBounds:
    """The largest |w| a set may hold per (layer, part group): `factor` x the base's own maximum."""

    base_absmax: BaseAbsmax = field(default_factory=dict)
    factor: float = DEFAULT_FACTOR

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(
                f"the weight bound factor must be > 0 (inf turns the check off), not {self.factor}"
            )

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.factor)

    def limit(self, layer: int, part: str) -> float | None:
        """The bound of `part` (canonical: gate, up, down, ...) in `layer`; None when unbounded (the
        check is off, or the base has no such part or only zeros there)."""
        base = self.base_absmax.get((layer, PART_GROUPS.get(part, part)))
        if not self.enabled or not base:
            return None
        return self.factor * base


def check_bounds(absmax: Mapping[str, float], bounds: WeightBounds, *, name: str | None = None) -> None:
    """Refuse a set whose expert tensors exceed their bounds (`absmax`: tensor name -> max |w|; NaN
    counts as out of bounds). Names that are not expert tensors (`params.*`) are not bounded here."""
    if not bounds.enabled:
        return
    worst: tuple[float, str, float, float, int, str] | None = None
    over = 0
    for tensor, value in absmax.items():
        m = _EXPERT_NAME.fullmatch(tensor)
        if m is None:
            continue
        layer, part = int(m.group(1)), m.group(3)
        limit = bounds.limit(layer, part)
        if limit is None or value <= limit:
            continue
        over += 1
        ratio = math.inf if math.isnan(value) else value / limit
        if worst is None or ratio > worst[0]:
            worst = (ratio, tensor, value, limit, layer, PART_GROUPS.get(part, part))
    if worst is None:
        return
    _, tensor, value, limit, layer, group = worst
    base = bounds.base_absmax[(layer, group)]
    who = f"expert set {name!r}: " if name else ""
    more = f"; {over - 1} more tensors are out of bounds" if over > 1 else ""
    raise WeightBoundError(
        f"{who}tensor {tensor} has max |w| {value:.4g}, above its bound {limit:.4g} "
        f"({bounds.factor:g} x the base experts' max |w| {base:.4g} in layer {layer} {group}){more}",
        hint="weights that far outside the base's range overflow to inf/NaN; retrain or re-export the set. "
        "If you trust it, raise the factor: `expertlib serve --weight-bound FACTOR` "
        "(ExpertEngine/compose: weight_bound=FACTOR; inf turns the check off)",
    )


__all__ = [
    "DEFAULT_FACTOR",
    "PART_GROUPS",
    "WeightBounds",
    "absmax",
    "check_bounds",
    "merge_absmax",
    "model_absmax",
    "set_absmax",
    "tensor_absmax",
]
