"""A task's routing profile: which routed experts the base sends the task's prompts to.

For MoE layer l and routed expert i, over the prompts j of a task (answers excluded: a request is
matched on its prompt alone, before anything is generated):

    P_{l,i} = 1/N * sum_j 1/L_j * sum_k 1[i in topK(k)] / K          (sums to 1 in every layer)

i.e. ESFT-Token over prompt tokens (`expertlib.esft.scoring`). Training records it in the set's
manifest (`Provenance.routing_profile`); `expertlib profile` adds it to sets made elsewhere. The
server's `model="auto"` scores a prompt's own routing under the base (its top-k picks counted per
expert, x_{l,i} as shares) against each candidate profile as the likelihood of those picks:

    similarity(x, P) = exp(-1/|L| * sum_l KL(x_l || P~_l)),   P~_l = (P_l + eps) / (1 + E eps)

the geometric mean, per pick, of P's probability over the prompt's own: 1 = the same routing,
towards 0 as the picks land where P rarely routes. Unlike a cosine of the mean shares, it weighs
the experts the few task-specific tokens (an instruction word) go to, which tells a task from
another of the same domain (bench/RESULTS.md, `model="auto"`).

Base anchors: profiles of what the base already does (its own data: the data `train` kept, the
demo base's pretraining tasks, or data given to `expertlib profile --anchor`), recorded beside a
set's profile (`Provenance.base_anchors`). They compete with the sets as candidates; when one wins,
the base serves. A composed set's profile is the token-weighted mixture of its parts' (`mixture`).

Stored compactly: per layer the shares as little-endian float16, base64 (~2.7 characters per
expert; a 48-layer, 128-expert base takes ~16 KB of manifest).

    prof = prompt_profile(model, samples, pad_id=pad)   # expertlib.esft.profiling
    similarity(prompt_counts, prof.arrays())            # in (0, 1]
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, Field

from expertlib.errors import DataError, PatchShapeError


class RoutingProfile(BaseModel):
    """Per MoE layer, the share of a task's prompt tokens' top-k picks that each routed expert gets."""

    num_experts: int = Field(ge=1, description="routed experts per layer (E)")
    tokens: int = Field(ge=0, description="prompt tokens measured")
    shares: dict[int, str] = Field(
        description="MoE layer -> E shares (sum 1), little-endian float16, base64-encoded"
    )

    @classmethod
    def from_shares(cls, shares: Mapping[int, Sequence[float]], *, tokens: int) -> RoutingProfile:
        if not shares:
            raise DataError("a routing profile needs at least one MoE layer", hint="check the base model")
        sizes = {len(v) for v in shares.values()}
        if len(sizes) != 1:
            raise PatchShapeError(f"layers disagree on the number of experts: {sorted(sizes)}")
        enc = {
            int(layer): base64.b64encode(np.asarray(v, dtype="<f2").tobytes()).decode("ascii")
            for layer, v in sorted(shares.items())
        }
        return cls(num_experts=sizes.pop(), tokens=tokens, shares=enc)

    def arrays(self) -> dict[int, np.ndarray]:
        """MoE layer -> (E,) float32 shares. PatchShapeError for a layer of the wrong length."""
        out = {}
        for layer, text in self.shares.items():
            try:
                v = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f2")
            except ValueError as exc:
                raise PatchShapeError(f"routing profile layer {layer}: not base64 float16 ({exc})") from None
            if v.shape != (self.num_experts,) or not np.isfinite(v).all():
                raise PatchShapeError(
                    f"routing profile layer {layer}: {v.size} shares for {self.num_experts} experts "
                    "or a non-finite value",
                    hint="re-run `expertlib profile` on the set",
                )
            out[int(layer)] = v.astype(np.float32)
        return out


#: Share added to every expert of a profile before scoring (`similarity`): a prompt's pick on an
#: expert its candidate never routes to costs a bounded amount instead of ruling the candidate out.
SMOOTHING = 1e-3


def similarity(shares: Mapping[int, np.ndarray], profile: Mapping[int, np.ndarray]) -> float:
    """exp(-mean over the layers both have of KL(shares_l || profile_l)), in (0, 1] (module docstring).
    `shares`: MoE layer -> (E,) counts or shares of a prompt's top-k picks; `profile`: a candidate's
    (E,) shares per layer. 0 when they have no layer in common or the prompt has no picks."""
    layers = [layer for layer in sorted(set(shares) & set(profile)) if float(np.sum(shares[layer])) > 0]
    if not layers:
        return 0.0
    total = 0.0
    for layer in layers:
        x = np.asarray(shares[layer], dtype=np.float64)  # (E,)
        x = x / x.sum()
        p = np.clip(np.asarray(profile[layer], dtype=np.float64), 0.0, None) + SMOOTHING  # (E,)
        p = p / p.sum()
        picked = x > 0
        total += float(np.sum(x[picked] * np.log(x[picked] / p[picked])))  # KL(x || p) >= 0
    return float(np.exp(-total / len(layers)))


def mixture(profiles: Sequence[RoutingProfile]) -> RoutingProfile:
    """The profile of a composition of sets: each layer's shares averaged over the parts, weighted by
    the prompt tokens each part's profile measured (as if their prompts were profiled together)."""
    if not profiles:
        raise DataError("a mixture needs at least one routing profile", hint="profile the parts first")
    if len({p.num_experts for p in profiles}) != 1:
        raise PatchShapeError(
            "the profiles disagree on the number of experts", hint="compose sets of one base"
        )
    weights = [max(p.tokens, 1) for p in profiles]
    arrays = [p.arrays() for p in profiles]
    layers = sorted(set.intersection(*(set(a) for a in arrays)))
    if not layers:
        raise PatchShapeError("the profiles have no MoE layer in common", hint="compose sets of one base")
    total = float(sum(weights))
    shares = {
        layer: sum(w * a[layer] for w, a in zip(weights, arrays, strict=True)) / total for layer in layers
    }
    return RoutingProfile.from_shares(shares, tokens=sum(p.tokens for p in profiles))
