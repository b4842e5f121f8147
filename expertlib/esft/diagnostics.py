"""Specialisation and retention-risk diagnostics: is ESFT likely to work on this base and task?

ESFT (ESFT.md) rests on one premise: in a fine-grained MoE, a task routes most of its tokens
through a few experts, and different tasks through different ones. Then training only a task's
experts teaches the task without touching what other abilities run through. Two measurements
check the premise, both from the ESFT-Token routing shares (`expertlib.esft.scoring`: per layer, the
share of routing slots each routed expert receives; they sum to 1 in every layer):

- **specialisation** (the paper's Figures 2-3): the share of a task's routing mass held by its
  top-k experts (k = the routing width, experts per token; chance is k / E), and the overlap of
  the top-k experts of two tasks (|top-k(A) ∩ top-k(B)| / k; 1 = the same experts);
- **retention risk**: per layer, the share of a *general* reference dataset's routing mass that
  the experts selected for a task carry. Training those experts changes what that share of the
  general data's tokens compute with; when it is large, general ability is at risk.

    general = routing_shares(model, general_samples, pad_id=pad)       # {layer: [share per expert]}
    risk = retention_risk(selection, general, task=scores.token)
    if risk.at_risk: print(risk.message())                              # what to do about it
    spec = specialisation({"math": math_shares, "code": code_shares}, k=6)
    print(format_specialisation(spec))

`builtin_general_samples` is the general set a base ships (`expertlib.esft.base_data`; the demo
base's general tasks); for another base, give your own (`--general data.jsonl`, e.g. a slice of its
pretraining mix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from expertlib.esft.selection import ExpertConfig

#: A layer is at risk when the selected experts carry more than this share of the general
#: data's routing mass (counted where the general data's answers are produced); chosen on the demo
#: base, where the selections under it keep general accuracy and one above it loses most of it (the
#: figures: bench/RESULTS.md, measured with each rebuild of the demo base). The mass is a necessary
#: condition, not a sufficient one: a low mass does not prove safety.
DEFAULT_RISK_THRESHOLD = 0.1
#: The name `--general` takes for the built-in general set.
BUILTIN_GENERAL = "builtin"

ADVICE = (
    "train with --keep GENERAL_DATA (retention-aware selection: the experts it routes through stay frozen)",
    "raise --top-p only if the task's own mass is spread thin; otherwise lower it so fewer shared experts train",
    "cap experts per layer (--max-per-layer) so the busiest general experts stay frozen",
    "score with --score gate (it selects fewer, more task-specific experts)",
    "train fewer steps or at a lower learning rate, and watch a general eval set (--eval-data)",
)


class LayerRetention(BaseModel):
    layer: int
    experts: list[int] = Field(description="experts selected in this layer")
    general_mass: float = Field(description="share of the general data's routing mass on these experts")
    task_mass: float | None = Field(default=None, description="share of the task's routing mass on them")
    chance: float = Field(description="share the same number of experts would carry under uniform routing")


class RetentionRisk(BaseModel):
    """How much of general routing a selection would retrain, per layer, and whether to worry."""

    threshold: float
    layers: list[LayerRetention]

    @property
    def mean_general_mass(self) -> float:
        return sum(r.general_mass for r in self.layers) / max(1, len(self.layers))

    @property
    def max_general_mass(self) -> float:
        return max((r.general_mass for r in self.layers), default=0.0)

    @property
    def at_risk(self) -> list[int]:
        """Layers whose selected experts carry more than `threshold` of the general mass."""
        return [r.layer for r in self.layers if r.general_mass > self.threshold]

    def summary(self) -> dict:
        return {
            "threshold": self.threshold,
            "mean_general_mass": round(self.mean_general_mass, 4),
            "max_general_mass": round(self.max_general_mass, 4),
            "at_risk_layers": self.at_risk,
            "per_layer": {
                str(r.layer): {
                    "experts": r.experts,
                    "general_mass": round(r.general_mass, 4),
                    "task_mass": None if r.task_mass is None else round(r.task_mass, 4),
                    "chance": round(r.chance, 4),
                }
                for r in self.layers
            },
        }

    def message(self) -> str:
        """A warning with what to do, or a one-line all-clear."""
        per_layer = ", ".join(f"{r.layer}: {r.general_mass:.2f}" for r in self.layers)
        if not self.at_risk:
            return (
                f"retention risk low: the selected experts carry {self.mean_general_mass:.2f} of the general "
                f"data's routing on average (max {self.max_general_mass:.2f}; per layer {per_layer})"
            )
        lines = [
            f"retention risk: in layers {', '.join(map(str, self.at_risk))} the selected experts carry more than "
            f"{self.threshold:.2f} of the general data's routing mass (per layer {per_layer}); training them "
            "is likely to damage general ability. What to do:"
        ]
        lines += [f"  - {a}" for a in ADVICE]
        return "\n".join(lines)


def _experts_of(selection: ExpertConfig | Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    experts = selection.experts if isinstance(selection, ExpertConfig) else selection
    return {int(layer): list(ids) for layer, ids in experts.items()}


def retention_risk(
    selection: ExpertConfig | Mapping[int, Sequence[int]],
    general: Mapping[int, Sequence[float]],
    *,
    task: Mapping[int, Sequence[float]] | None = None,
    threshold: float = DEFAULT_RISK_THRESHOLD,
) -> RetentionRisk:
    """Per layer, the general data's routing mass (ESFT-Token shares) on the selected experts."""
    layers = []
    general = {int(k): v for k, v in general.items()}
    task = {int(k): v for k, v in task.items()} if task is not None else None
    for layer, ids in sorted(_experts_of(selection).items()):
        if layer not in general:
            raise KeyError(f"no general routing for MoE layer {layer}")
        g = general[layer]
        total = sum(g) or 1.0
        layers.append(
            LayerRetention(
                layer=layer,
                experts=ids,
                general_mass=sum(g[i] for i in ids) / total,
                task_mass=(sum(task[layer][i] for i in ids) / (sum(task[layer]) or 1.0)) if task else None,
                chance=len(ids) / len(g),
            )
        )
    return RetentionRisk(threshold=threshold, layers=layers)


# --- specialisation ---------------------------------------------------------------------------------


def top_experts(shares: Sequence[float], k: int) -> list[int]:
    """Ids of the `k` experts with the largest shares (ties: lower id first), sorted."""
    return sorted(sorted(range(len(shares)), key=lambda i: (-shares[i], i))[:k])


def concentration(shares: Mapping[int, Sequence[float]], k: int) -> dict[int, float]:
    """Per layer, the share of the routing mass held by the top-`k` experts."""
    out = {}
    for layer, s in shares.items():
        total = sum(s) or 1.0
        out[int(layer)] = sum(s[i] for i in top_experts(s, k)) / total
    return out


def top_overlap(
    a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]], k: int
) -> dict[int, float]:
    """Per layer, |top-k(a) ∩ top-k(b)| / k."""
    b = {int(layer): s for layer, s in b.items()}
    return {
        int(layer): len(set(top_experts(s, k)) & set(top_experts(b[int(layer)], k))) / k
        for layer, s in a.items()
    }


class Specialisation(BaseModel):
    """How concentrated each dataset's routing is, and how much the top experts of two datasets overlap."""

    k: int = Field(description="top experts counted (default: the routing width)")
    num_experts: int
    concentration: dict[str, float] = Field(description="dataset -> mean over layers of its top-k share")
    concentration_per_layer: dict[str, dict[int, float]]
    overlap: dict[str, dict[str, float]] = Field(description="mean over layers of |top-k(A) ∩ top-k(B)| / k")

    @property
    def chance(self) -> float:
        """The top-k share under uniform routing."""
        return self.k / self.num_experts


def specialisation(shares_by_name: Mapping[str, Mapping[int, Sequence[float]]], k: int) -> Specialisation:
    """Concentration of each dataset's routing and the pairwise overlap of their top-k experts."""
    if not shares_by_name:
        raise ValueError("no routing shares given")
    names = list(shares_by_name)
    first = next(iter(shares_by_name[names[0]].values()))
    conc = {n: concentration(shares_by_name[n], k) for n in names}
    overlap: dict[str, dict[str, float]] = {}
    for a in names:
        overlap[a] = {}
        for b in names:
            per_layer = top_overlap(shares_by_name[a], shares_by_name[b], k)
            overlap[a][b] = round(sum(per_layer.values()) / max(1, len(per_layer)), 4)
    return Specialisation(
        k=k,
        num_experts=len(first),
        concentration={n: round(sum(c.values()) / max(1, len(c)), 4) for n, c in conc.items()},
        concentration_per_layer={n: {layer: round(v, 4) for layer, v in c.items()} for n, c in conc.items()},
        overlap=overlap,
    )


def format_specialisation(spec: Specialisation) -> str:
    """Plain-text table: each dataset's top-k share, then the overlap matrix."""
    names = list(spec.concentration)
    w = max(8, *(len(n) for n in names))
    lines = [
        f"specialisation: share of routing mass on each dataset's top {spec.k} of {spec.num_experts} experts "
        f"(mean over layers; uniform routing would give {spec.chance:.2f})"
    ]
    lines += [f"  {n:<{w}} {spec.concentration[n]:.2f}" for n in names]
    if len(names) > 1:
        lines.append(f"overlap of the top-{spec.k} experts (1 = the same experts; mean over layers)")
        lines.append("  " + " " * w + " " + " ".join(f"{n[:8]:>8}" for n in names))
        for a in names:
            lines.append(f"  {a:<{w}} " + " ".join(f"{spec.overlap[a][b]:>8.2f}" for b in names))
    return "\n".join(lines)


# --- routing of a dataset -----------------------------------------------------------------------------


def routing_shares(
    model,
    samples,
    *,
    pad_id: int,
    token_budget: int | None = 20_000,
    batch_size: int = 16,
    count_prompt_tokens: bool = True,
    seed: int = 0,
) -> dict[int, list[float]]:
    """ESFT-Token shares of `samples` per MoE layer (forward passes only; sums to 1 per layer)."""
    from expertlib.esft.scoring import score_experts

    scores = score_experts(
        model,
        samples,
        pad_id=pad_id,
        token_budget=token_budget,
        batch_size=batch_size,
        count_prompt_tokens=count_prompt_tokens,
        seed=seed,
        progress=False,
    )
    return {int(k): v for k, v in scores.token.items()}


def builtin_general_samples(
    base: str | Path, tokenizer, *, n_per_task: int | None = None, max_length: int = 2048
):
    """The general set `base` ships (`expertlib.esft.base_data`; on the demo base its general
    tasks' eval prompts, never trained on), encoded: the first `n_per_task` of each task (default all)."""
    from expertlib.errors import DataError
    from expertlib.esft.base_data import GENERAL, reference_samples

    shipped = reference_samples(base, GENERAL, tokenizer, n=n_per_task, max_length=max_length)
    if not shipped:
        raise DataError(
            f"the base at {base} ships no general reference data (reference_data/general/*.jsonl), "
            f"so `{BUILTIN_GENERAL}` names nothing",
            hint="pass general data as a jsonl file (e.g. a slice of the base's pretraining mix)",
        )
    return [s for samples in shipped.values() for s in samples]


def general_samples(general: str | Path, tokenizer, *, base: str | Path | None, max_length: int = 2048):
    """Samples of a general reference set: a jsonl path, or `builtin` (the set `base` ships)."""
    if str(general) == BUILTIN_GENERAL:
        return builtin_general_samples(base, tokenizer, max_length=max_length)
    from expertlib.esft.data import load_samples

    return load_samples(general, tokenizer, max_length=max_length, too_long="truncate")


def general_routing(
    model,
    tokenizer,
    general: str | Path,
    *,
    base: str | Path | None = None,
    token_budget: int | None = 20_000,
    max_length: int = 2048,
) -> dict[int, list[float]]:
    """Routing shares of a general reference set (path or `builtin`: the set `base` ships, by
    default the folder `model` was loaded from) on `model`.

    Only the positions that produce the general data's answers count (`trained_positions`):
    general ability shows there, and the prompt and chat-template tokens every task shares would
    otherwise dilute the figure (on the demo base they hid an answer-position overlap behind a
    several times smaller all-token share).
    """
    from expertlib.esft.data import pad_token_id

    base = base if base is not None else model.config.name_or_path
    samples = general_samples(general, tokenizer, base=base, max_length=max_length)
    return routing_shares(
        model, samples, pad_id=pad_token_id(tokenizer), token_budget=token_budget, count_prompt_tokens=False
    )


def check_retention(
    model,
    tokenizer,
    selection: ExpertConfig | Mapping[int, Sequence[int]],
    general: str | Path,
    *,
    task: Mapping[int, Sequence[float]] | None = None,
    threshold: float = DEFAULT_RISK_THRESHOLD,
    base: str | Path | None = None,
) -> RetentionRisk:
    """`retention_risk` of `selection` against the routing of the general set `general` on `model`
    (`builtin`: the set `base` ships, by default the folder `model` was loaded from)."""
    general_shares = general_routing(model, tokenizer, general, base=base)
    return retention_risk(selection, general_shares, task=task, threshold=threshold)


def diagnose_scores(
    base: str | Path, scores, general: str | Path, *, threshold: float = DEFAULT_RISK_THRESHOLD
) -> dict:
    """For a task's `ExpertScores`: retention risk of the paper's default selections (ESFT-Token
    p=0.2, ESFT-Gate p=0.1) and the task's specialisation against the general set."""
    from expertlib.esft.data import load_tokenizer
    from expertlib.esft.selection import DEFAULT_TOP_P, select_experts
    from expertlib.moe import load_model

    model = load_model(base)
    model.float()
    general_shares = general_routing(model, load_tokenizer(base), general, base=base)
    out: dict = {"general": str(general), "risk": {}}
    for score, p in DEFAULT_TOP_P.items():
        selection = select_experts(scores.of(score), p)
        risk = retention_risk(selection, general_shares, task=scores.token, threshold=threshold)
        out["risk"][f"esft-{score} p={p}"] = risk
    spec = specialisation({"task": scores.token, "general": general_shares}, k=scores.top_k)
    out["specialisation"] = spec
    return out
