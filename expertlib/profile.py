"""A task's routing profile: which routed experts the base sends the task's prompts to.

For MoE layer l and routed expert i, over the prompts j of a task (answers excluded: a request is
matched on its prompt alone, before anything is generated):

    P_{l,i} = 1/N * sum_j 1/L_j * sum_k 1[i in topK(k)] / K          (sums to 1 in every layer)

i.e. ESFT-Token over prompt tokens (`expertlib.esft.scoring`). Training records it in the set's
manifest (`Provenance.routing_profile`); `expertlib profile` adds it to sets made elsewhere. The
server's `model="auto"` compares a prompt's own routing under the base (the same statistic over
its tokens) with each set's profile by cosine similarity, averaged over layers (`similarity`).

Stored compactly: per layer the shares as little-endian float16, base64 (~2.7 characters per
expert; a 48-layer, 128-expert base takes ~16 KB of manifest).

    prof = prompt_profile(model, samples, pad_id=pad)   # expertlib.esft.profiling
    similarity(prompt_shares, prof.arrays())            # in [0, 1]
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


def similarity(shares: Mapping[int, np.ndarray], profile: Mapping[int, np.ndarray]) -> float:
    """Mean over the layers both have of cos(shares_l, profile_l): 1 = the same routing, 0 = disjoint
    experts. `shares`: MoE layer -> (E,) counts or shares of a prompt's top-k picks."""
    layers = sorted(set(shares) & set(profile))
    if not layers:
        return 0.0
    total = 0.0
    for layer in layers:
        a = np.asarray(shares[layer], dtype=np.float64)  # (E,)
        b = np.asarray(profile[layer], dtype=np.float64)  # (E,)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        total += float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
    return total / len(layers)
