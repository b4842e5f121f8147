"""Which experts to train: the ESFT top-p rule per layer, and the reference `expert_cfg.json`.

Rule (ESFT.md, "Selection rule"): in each MoE layer sort the routed experts by score,
descending (ties: lower id first), and add them until the running sum is >= p; that prefix is
the layer's set, at least one expert, optionally capped at `max_per_layer`.

    cfg = select_experts(scores.token, top_p=0.2)          # ExpertConfig
    cfg.save("experts.json")                                # the reference expert_cfg.json shape

Retention-aware selection (`keep`): given the routing shares of data whose skills must stay
(the same per-layer ESFT-Token shares the retention check uses, `expertlib.esft.diagnostics`),

- `keep_mode="contrast"`: rank experts by task relevance against kept relevance,
  max(0, task share - kept share) per expert (the largest kept share when several datasets are
  kept), and apply the top-p rule to that; an expert the kept data uses as much as the task never
  trains, a layer may end up empty. It ranks; it does not bound the kept share;
- `keep_mode="budget"`: take the paper's top-p set, then walk it in score order and keep an
  expert only while the selected experts of the layer carry at most `keep_share` of every kept
  dataset's routing (the retention check's statistic, bounded exactly);
- `keep_mode="capped"`: contrast's ranking under budget's bound. Walk the experts in contrast
  order and take one only while the layer's selection stays within `keep_share` of every kept
  dataset's routing, until the taken contrast reaches top-p or the layer has as many experts as
  contrast alone would train: an expert past the bound is replaced by the next one under it, never
  by more experts;
- `keep_mode="capped-wide"` (the default; chosen on the tuning tasks, bench/RESULTS.md): capped's
  ranking and bound with the paper's count. It goes on past capped's stop, still in contrast order
  and within `keep_share`, until the layer has as many experts as the paper's top-p set (or
  contrast's, if more), counted on `count_scores` where given: `expertlib train` passes the scores
  with every token counted, as the paper scores, while it ranks by answer-only scores (which give one
  dominant expert a layer on many tasks). It always holds capped's experts: contrast shares sum to 1
  over fewer experts, so capped's count is often one a layer where the paper's is two or three.

    cfg = select_experts(scores.token, 0.2, keep=[general_shares], keep_share=0.1)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from expertlib.errors import SelectionError
from expertlib.fsutil import atomic_write_text

#: Paper defaults of p per score function.
DEFAULT_TOP_P = {"token": 0.2, "gate": 0.1}
#: Slack on the running-sum comparison, so 0.7 + 0.2 + 0.1 reaches p = 1.0 despite rounding.
#: The reference code compares without slack; `select_experts(..., eps=0.0)` does the same.
DEFAULT_EPS = 1e-9
#: Most of a kept dataset's routing (per layer) the selected experts may carry: the retention
#: check's threshold (`expertlib.esft.diagnostics.DEFAULT_RISK_THRESHOLD`).
DEFAULT_KEEP_SHARE = 0.1

KeepMode = Literal["budget", "capped", "capped-wide", "contrast"]
#: The default keep mode (`SelectionConfig.keep_mode`, `select_experts`).
DEFAULT_KEEP_MODE: KeepMode = "capped-wide"


def top_p_rule(score: str, top_p: float | None, weighting: str) -> tuple[float, float]:
    """(p, eps) of the top-p rule, the one place they are chosen: p as given or the paper's for the
    score function; no slack on the running sum for reference-weighted scores, as the reference code."""
    return (top_p if top_p is not None else DEFAULT_TOP_P[score]), (
        0.0 if weighting == "reference" else DEFAULT_EPS
    )


class ExpertConfig(BaseModel):
    """The reference ESFT `expert_cfg.json`: experts to train per MoE layer, plus the ablation flags."""

    experts: dict[int, list[int]] = Field(description="MoE layer -> routed expert ids to train")
    shared_experts: bool = Field(default=False, description="also train the shared experts (paper ablation)")
    non_expert_modules: bool = Field(
        default=False, description="also train attention, norms, embeddings, head"
    )

    @field_validator("experts")
    @classmethod
    def _valid(cls, v: dict[int, list[int]]) -> dict[int, list[int]]:
        out = {}
        for layer, ids in sorted(v.items()):
            if layer < 0 or any(int(i) < 0 for i in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"layer {layer}: expert ids must be distinct and >= 0, got {ids}")
            out[int(layer)] = sorted(int(i) for i in ids)
        return out

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    def to_reference(self, moe_layers: Sequence[int] | None = None) -> dict:
        """The reference JSON: string layer keys. The reference loader (`to_esft`) raises KeyError
        on any MoE layer missing from the config, so pass the model's `moe_layers` to write every
        one of them (an empty list where nothing trains)."""
        layers = sorted(set(self.experts) | set(moe_layers or ()))
        return {
            "experts": {str(layer): self.experts.get(layer, []) for layer in layers},
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }

    def save(self, path: str | Path, moe_layers: Sequence[int] | None = None) -> Path:
        return atomic_write_text(path, json.dumps(self.to_reference(moe_layers), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        """Read an expert config (ours or a reference ESFT `expert_cfg.json`)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            return cls.model_validate(raw)
        except (OSError, json.JSONDecodeError, ValidationError) as exc:
            raise SelectionError(
                f"{path}: not a valid expert config: {exc}",
                hint='expected {"experts": {"<layer>": [ids]}, "shared_experts": bool, "non_expert_modules": bool}',
            ) from None

    def check_against(self, moe_layers: Sequence[int], num_experts: int) -> None:
        """Refuse layers that are not MoE layers of the model, or expert ids out of range."""
        bad_layers = sorted(set(self.experts) - set(moe_layers))
        if bad_layers:
            raise SelectionError(
                f"expert config names layers {bad_layers} that are not MoE layers of this model",
                hint=f"MoE layers: {list(moe_layers)}",
            )
        for layer, ids in self.experts.items():
            bad = [e for e in ids if e >= num_experts]
            if bad:
                raise SelectionError(f"layer {layer}: expert ids {bad} out of range (0..{num_experts - 1})")


def top_p_layer(
    scores: Sequence[float], top_p: float, *, max_experts: int | None = None, eps: float = DEFAULT_EPS
) -> list[int]:
    """Expert ids of one layer: the shortest score-descending prefix whose sum reaches `top_p`
    (within `eps`: the default forgives float rounding; the reference code uses 0)."""
    if not scores:
        raise SelectionError("a layer without scores")
    if not top_p > 0:
        raise SelectionError(f"top-p must be > 0, got {top_p}")
    if max_experts is not None and max_experts < 1:
        raise SelectionError(f"max experts per layer must be >= 1, got {max_experts}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen, running = [], 0.0
    for i in order:
        chosen.append(i)
        running += scores[i]
        if running + eps >= top_p or (max_experts is not None and len(chosen) >= max_experts):
            break
    return sorted(chosen)


def _shares(values: Sequence[float]) -> list[float]:
    total = sum(values) or 1.0
    return [v / total for v in values]


def keep_layer(
    scores: Sequence[float],
    top_p: float,
    kept: Sequence[Sequence[float]],
    *,
    mode: KeepMode = DEFAULT_KEEP_MODE,
    keep_share: float = DEFAULT_KEEP_SHARE,
    max_experts: int | None = None,
    eps: float = DEFAULT_EPS,
    count_scores: Sequence[float] | None = None,
) -> list[int]:
    """Expert ids of one layer chosen with the kept datasets' routing shares `kept` in mind
    (module docstring); may be empty. Without `kept` it is `top_p_layer`. `count_scores`: the
    scores whose top-p count capped-wide fills to (default `scores`)."""
    if not kept:
        return top_p_layer(scores, top_p, max_experts=max_experts, eps=eps)
    if any(len(k) != len(scores) for k in kept):
        raise SelectionError(f"kept routing has {[len(k) for k in kept]} experts, the scores {len(scores)}")
    kept = [_shares(k) for k in kept]
    if mode not in ("budget", "capped", "capped-wide", "contrast"):
        raise SelectionError(f"unknown keep mode {mode!r}", hint="capped, capped-wide, contrast or budget")
    carried = [0.0] * len(kept)
    chosen: list[int] = []

    def fits(e: int) -> bool:  # the layer stays within keep_share of every kept dataset with e
        return all(c + k[e] <= keep_share + eps for c, k in zip(carried, kept, strict=True))

    def take(e: int) -> None:
        nonlocal carried
        chosen.append(e)
        carried = [c + k[e] for c, k in zip(carried, kept, strict=True)]

    if mode == "budget":
        for e in sorted(
            top_p_layer(scores, top_p, max_experts=max_experts, eps=eps), key=lambda i: (-scores[i], i)
        ):
            if fits(e):
                take(e)
        return sorted(chosen)
    task = _shares(scores)
    contrast = _shares([max(0.0, t - max(k[i] for k in kept)) for i, t in enumerate(task)])
    if not any(contrast):
        return []
    unbounded = top_p_layer(contrast, top_p, max_experts=max_experts, eps=eps)
    if mode == "contrast":
        return unbounded
    wide = mode == "capped-wide"  # capped stops at contrast's count, capped-wide at the paper's
    count = len(unbounded)
    if wide:
        paper = scores if count_scores is None else count_scores
        count = max(count, len(top_p_layer(paper, top_p, max_experts=max_experts, eps=eps)))
    running = 0.0  # the contrast taken
    for e in sorted((i for i, c in enumerate(contrast) if c > 0), key=lambda i: (-contrast[i], i)):
        if fits(e):
            take(e)
            running += contrast[e]
        if len(chosen) >= count or (not wide and running + eps >= top_p):
            break
    return sorted(chosen)


def select_experts(
    scores: Mapping[int, Sequence[float]],
    top_p: float,
    *,
    max_per_layer: int | None = None,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    eps: float = DEFAULT_EPS,
    keep: Sequence[Mapping[int, Sequence[float]]] = (),
    keep_mode: KeepMode = DEFAULT_KEEP_MODE,
    keep_share: float = DEFAULT_KEEP_SHARE,
    count_scores: Mapping[int, Sequence[float]] | None = None,
) -> ExpertConfig:
    """Apply the top-p rule to every layer's scores (see module docstring); with `keep` (routing
    shares per layer of each dataset to keep), retention-aware (`keep_layer`)."""
    kept = [{int(k): v for k, v in shares.items()} for shares in keep]
    for layer in scores:
        if any(int(layer) not in k for k in kept):
            raise SelectionError(f"no kept routing for MoE layer {layer}")
    return ExpertConfig(
        experts={
            int(layer): keep_layer(
                s,
                top_p,
                [k[int(layer)] for k in kept],
                mode=keep_mode,
                keep_share=keep_share,
                max_experts=max_per_layer,
                eps=eps,
                count_scores=None if count_scores is None else count_scores[layer],
            )
            for layer, s in scores.items()
        },
        shared_experts=shared_experts,
        non_expert_modules=non_expert_modules,
    )
