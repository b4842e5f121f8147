"""Compare expert sets of one base model: which experts each retrained, and how differently.

    report = diff_expert_sets([math, code], ["math@1", "code@2"], base_dir="./base")
    report.pairs[0].jaccard          # |A ∩ B| / |A ∪ B| over (layer, expert) pairs
    report.pairs[0].rel_diff         # ||a - b|| / ||b|| per expert both sets retrained
    report.sets[0].mean_moved        # ||w - w_base|| / ||w_base||, needs the base checkpoint
    plot_diff(report, "overlap.png") # heatmap layers x experts, coloured by which sets retrained

Norms are Frobenius norms over an expert's parts (gate, up, down [, biases]) taken together,
computed in float64. The base experts are read lazily from the base folder's safetensors
checkpoint (`expertlib.checkpoint.BaseCheckpoint`, every architecture incl. fused gpt_oss);
no model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from expertlib.errors import BaseMismatchError, PatchShapeError
from expertlib.identity import BaseIdentity
from expertlib.moe import ExpertWeights
from expertlib.patch import ExpertSet, pair_key


class ExpertDelta(BaseModel):
    layer: int
    expert: int
    rel_diff: float = Field(description="||a - b|| / ||b||")


class LayerOverlap(BaseModel):
    layer: int
    experts: dict[str, list[int]] = Field(description="set label -> expert ids it retrained in this layer")
    shared: list[int] = Field(description="ids every set retrained")
    jaccard: float | None = Field(
        description="|intersection| / |union| of all sets' ids (None: no set touches it)"
    )


class PairDiff(BaseModel):
    a: str
    b: str
    shared_experts: int
    union_experts: int
    jaccard: float
    rel_diff: list[ExpertDelta] = Field(description="per expert both retrained: ||a - b|| / ||b||")
    mean_rel_diff: float | None = None
    max_rel_diff: float | None = None


class SetSummary(BaseModel):
    label: str
    task: str
    num_experts: int
    layers: int
    fraction_of_routed: float | None = Field(default=None, description="share of the base's routed experts")
    moved: list[ExpertDelta] | None = Field(
        default=None, description="||w - w_base|| / ||w_base|| per expert"
    )
    mean_moved: float | None = None
    max_moved: float | None = None


class DiffReport(BaseModel):
    labels: list[str]
    base: BaseIdentity
    num_experts: int | None = Field(default=None, description="routed experts per layer (known with a base)")
    moe_layers: list[int] | None = Field(
        default=None, description="the base's MoE layers (known with a base)"
    )
    layers: list[LayerOverlap]
    pairs: list[PairDiff]
    sets: list[SetSummary]
    overlap_matrix: list[list[float]] = Field(description="Jaccard overlap of every pair of sets (symmetric)")
    notes: list[str] = Field(default_factory=list)
    general: dict[str, dict] | None = Field(
        default=None,
        description="set label -> share of a general dataset's routing on its experts "
        "(expertlib.esft.diagnostics.RetentionRisk.summary; `add_general_overlap`)",
    )


def add_general_overlap(report: DiffReport, general_shares: dict[int, list[float]], **kw) -> DiffReport:
    """Fill `report.general`: per set, the general data's routing mass on the experts it retrained."""
    from expertlib.esft.diagnostics import retention_risk

    report.general = {}
    for label in report.labels:
        sel = {lo.layer: lo.experts[label] for lo in report.layers if lo.experts.get(label)}
        report.general[label] = retention_risk(sel, general_shares, **kw).summary()
    return report


def _flat(w: ExpertWeights) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for _, t in w.items()])


def rel_diff(a: ExpertWeights, b: ExpertWeights) -> float:
    """||a - b|| / ||b|| over all parts of an expert (Frobenius, float64)."""
    fa, fb = _flat(a), _flat(b)
    if fa.shape != fb.shape:
        raise PatchShapeError(
            f"experts of different sizes ({fa.numel()} vs {fb.numel()} values) cannot be compared"
        )
    denom = float(torch.linalg.vector_norm(fb))
    num = float(torch.linalg.vector_norm(fa - fb))
    return num / denom if denom > 0 else (0.0 if num == 0 else float("inf"))


def _stats(deltas: list[ExpertDelta]) -> tuple[float | None, float | None]:
    if not deltas:
        return None, None
    vals = [d.rel_diff for d in deltas]
    return sum(vals) / len(vals), max(vals)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def diff_expert_sets(
    sets: Sequence[ExpertSet], labels: Sequence[str] | None = None, *, base_dir: str | Path | None = None
) -> DiffReport:
    """Compare two or more expert sets made for the same base (optionally against the base weights)."""
    if len(sets) < 2:
        raise ValueError("diff needs at least two expert sets")
    labels = list(labels or [s.manifest.task for s in sets])
    if len(set(labels)) != len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    base = sets[0].manifest.base
    for s, lab in zip(sets[1:], labels[1:], strict=True):
        if not s.manifest.base.same_base(base):
            raise BaseMismatchError(
                f"{lab} was made for another base ({s.manifest.base.name or s.manifest.base.model_type}) "
                f"than {labels[0]} ({base.name or base.model_type})",
                hint="diff compares expert sets of one base model",
            )
    pairs_of = [set(s.manifest.pairs()) for s in sets]
    notes: list[str] = []

    all_layers = sorted({layer for s in sets for layer in s.manifest.experts})
    layers = []
    for layer in all_layers:
        ids = {lab: s.manifest.experts.get(layer, []) for lab, s in zip(labels, sets, strict=True)}
        sets_ids = [set(v) for v in ids.values()]
        inter, union = set.intersection(*sets_ids), set.union(*sets_ids)
        layers.append(
            LayerOverlap(
                layer=layer,
                experts=ids,
                shared=sorted(inter),
                jaccard=len(inter) / len(union) if union else None,
            )
        )

    pairs = []
    n = len(sets)
    matrix = [[1.0] * n for _ in range(n)]
    for i, j in combinations(range(n), 2):
        shared = sorted(pairs_of[i] & pairs_of[j])
        deltas = [
            ExpertDelta(
                layer=layer, expert=e, rel_diff=rel_diff(sets[i].expert(layer, e), sets[j].expert(layer, e))
            )
            for layer, e in shared
        ]
        mean, mx = _stats(deltas)
        jac = _jaccard(pairs_of[i], pairs_of[j])
        matrix[i][j] = matrix[j][i] = jac
        pairs.append(
            PairDiff(
                a=labels[i],
                b=labels[j],
                shared_experts=len(shared),
                union_experts=len(pairs_of[i] | pairs_of[j]),
                jaccard=jac,
                rel_diff=deltas,
                mean_rel_diff=mean,
                max_rel_diff=mx,
            )
        )

    num_experts, moved = _moved_from_base(sets, labels, base, base_dir, notes)
    moe_layers = _moe_layers(base_dir) if base_dir is not None else None
    summaries = []
    for k, (s, lab) in enumerate(zip(sets, labels, strict=True)):
        m = s.manifest
        deltas = moved[k] if moved is not None else None
        mean, mx = _stats(deltas or [])
        frac = None
        if num_experts and moe_layers:
            frac = m.num_experts / (num_experts * len(moe_layers))
        summaries.append(
            SetSummary(
                label=lab,
                task=m.task,
                num_experts=m.num_experts,
                layers=len(m.experts),
                fraction_of_routed=frac,
                moved=deltas,
                mean_moved=mean,
                max_moved=mx,
            )
        )
    if base_dir is None:
        notes.append("distance from the base not computed: pass the base model folder (--base) to get it")
    return DiffReport(
        labels=labels,
        base=base,
        num_experts=num_experts,
        moe_layers=moe_layers,
        layers=layers,
        pairs=pairs,
        sets=summaries,
        overlap_matrix=matrix,
        notes=notes,
    )


def _moe_layers(base_dir) -> list[int]:
    """MoE layer indices of the base, from its config (the decoder-sparsity rules of each family)."""
    from expertlib.identity import load_config

    cfg = load_config(base_dir)
    first = int(getattr(cfg, "first_k_dense_replace", 0) or 0)
    freq = int(getattr(cfg, "moe_layer_freq", 1) or 1)
    mlp_only = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return [
        i
        for i in range(first, cfg.num_hidden_layers)
        if i not in mlp_only and (i + 1) % step == 0 and i % freq == 0
    ]


def _moved_from_base(sets, labels, base: BaseIdentity, base_dir, notes) -> tuple[int | None, list | None]:
    if base_dir is None:
        return None, None
    from expertlib.checkpoint import BaseCheckpoint
    from expertlib.identity import folder_identity

    ident = folder_identity(base_dir)
    if not ident.same_base(base):
        raise BaseMismatchError(
            f"{base_dir} is a {ident.model_type} base ({ident.config_digest[:19]}...), the sets were made for "
            f"{base.name or base.model_type} ({base.config_digest[:19]}...)",
            hint="pass the base model folder the sets were trained on",
        )
    ck = BaseCheckpoint(base_dir)
    out = []
    cache: dict[tuple[int, int], ExpertWeights] = {}
    for s, lab in zip(sets, labels, strict=True):
        deltas = []
        for (layer, e), w in s.experts():
            if (layer, e) not in cache:
                cache[(layer, e)] = ck.expert(layer, e)
            b = cache[(layer, e)]
            if b.digest() != s.manifest.base_expert_digests[pair_key(layer, e)]:
                raise BaseMismatchError(
                    f"expert {e} of layer {layer} in {base_dir} is not the base expert {lab} was made from",
                    hint="same architecture and config but other weights: pass the exact base checkpoint",
                )
            deltas.append(ExpertDelta(layer=layer, expert=e, rel_diff=rel_diff(w, b)))
        out.append(deltas)
    return int(getattr(ck.config, ck.spec.experts_field)), out


def plot_diff(report: DiffReport, path: str | Path, *, num_experts: int | None = None) -> Path:
    """Heatmap, layers x experts; each cell coloured by the combination of sets that retrained it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    path = Path(path)
    by_layer = {lo.layer: lo for lo in report.layers}
    layers = sorted(set(report.moe_layers or []) | set(by_layer))
    max_id = max((e for lo in report.layers for ids in lo.experts.values() for e in ids), default=0)
    width = num_experts or report.num_experts or max_id + 1
    combos: dict[tuple[str, ...], int] = {}
    grid = [[0] * width for _ in layers]
    for r, layer in enumerate(layers):
        lo = by_layer.get(layer)
        for e in range(width if lo is not None else 0):
            who = tuple(lab for lab in report.labels if e in lo.experts.get(lab, []))
            if who:
                grid[r][e] = combos.setdefault(who, len(combos) + 1)
    palette = plt.get_cmap("tab20").colors if len(combos) > 10 else plt.get_cmap("tab10").colors
    colors = ["#ffffff"] + [palette[i % len(palette)] for i in range(len(combos))]
    fig_w = min(max(6.0, 0.25 * width + 3), 40)
    fig_h = min(max(3.0, 0.35 * len(layers) + 1.5), 40)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(
        grid,
        cmap=ListedColormap(colors),
        vmin=0,
        vmax=len(colors) - 1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    if width <= 64:
        ax.set_xticks(range(width))
        ax.tick_params(axis="x", labelsize=7)
    if width <= 256:  # thin lines between cells
        ax.set_xticks([x - 0.5 for x in range(1, width)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(layers))], minor=True)
        ax.grid(which="minor", color="#d0d0d0", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.set_title("Experts retrained: " + " vs ".join(report.labels))
    handles = [Patch(facecolor=colors[i], edgecolor="grey", label=" + ".join(c)) for c, i in combos.items()]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
