"""Read the routing logs of the ESFT reference code (deepseek-ai/ESFT) and score them.

The reference's scoring run (`get_expert_scores.py` with `log_expert_weights`) appends one line
per forward pass (one sequence) to `expert_weights_<L>.txt` for each MoE layer L, in one
`rank_<r>/` folder per process:

    <id>\\t<id>\\t...\\t<id>\\t\\t<w>\\t<w>\\t...\\t<w>

the token-by-token top-K expert ids, two tabs, then the matching gate weights (rounded to 4
decimals). `score_reference_logs` turns such a folder into the same per-layer ESFT-Token and
ESFT-Gate scores as `expertlib score`, with either weighting (`expertlib.esft.scoring`); with
`weighting="reference"` it reproduces the reference's `summary.json` exactly.

    logs = score_reference_logs("results/expert_scores/intent", top_k=6, weighting="reference")
    cfg = select_experts(logs.token, 0.2, eps=0.0)      # the reference's expert config
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from expertlib.errors import SelectionError
from expertlib.esft.scoring import ScoreFunction, Weighting, check_weighting, finish_scores, token_weights

#: File name of one layer's log; the number is the model's layer index.
LOG_PATTERN = re.compile(r"^expert_weights_(\d+)\.txt$")


@dataclass
class ReferenceLogScores:
    """Per-layer scores computed from reference routing logs."""

    token: dict[int, list[float]]
    gate: dict[int, list[float]]
    top_k: int
    num_experts: int
    tokens: int
    sequences: int
    weighting: Weighting
    source: str

    def of(self, score: ScoreFunction) -> dict[int, list[float]]:
        if score not in ("token", "gate"):
            raise SelectionError(f"unknown score function {score!r}", hint="use 'token' or 'gate'")
        return self.token if score == "token" else self.gate


def is_reference_log_dir(path: str | Path) -> bool:
    """True when `path` is a folder holding `expert_weights_<L>.txt` files (or `rank_*/` folders of them)."""
    return bool(_log_files(Path(path))) if Path(path).is_dir() else False


def _log_files(folder: Path) -> dict[int, list[Path]]:
    """Layer -> its log files, directly in `folder` and in its `rank*` subfolders."""
    out: dict[int, list[Path]] = {}
    dirs = [folder, *sorted(d for d in folder.iterdir() if d.is_dir() and d.name.startswith("rank"))]
    for d in dirs:
        for f in sorted(d.iterdir()):
            m = LOG_PATTERN.match(f.name)
            if m and f.is_file():
                out.setdefault(int(m.group(1)), []).append(f)
    return out


def parse_log_line(line: str, top_k: int, *, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One sequence's (ids (T*K,), weights (T*K,)) from a log line."""
    try:
        ids_part, weights_part = line.rstrip("\n").split("\t\t")
        ids = np.array(ids_part.split("\t"), dtype=np.int64)
        weights = np.array(weights_part.split("\t"), dtype=np.float64)
    except ValueError as exc:
        raise SelectionError(
            f"{where}: not a reference routing log line ({exc})",
            hint="expected tab-separated expert ids, two tabs, then the matching gate weights",
        ) from None
    if len(ids) != len(weights) or len(ids) % top_k:
        raise SelectionError(
            f"{where}: {len(ids)} ids and {len(weights)} weights are not whole tokens of top-{top_k}",
            hint="pass the model's top-k (num_experts_per_tok; DeepSeek-V2-Lite: 6)",
        )
    return ids, weights


def score_reference_logs(
    folder: str | Path,
    *,
    top_k: int,
    num_experts: int | None = None,
    weighting: Weighting = "paper",
) -> ReferenceLogScores:
    """ESFT-Token and ESFT-Gate scores per layer from a folder of reference routing logs.

    Each log line is one sequence of L_j = (ids on the line) / `top_k` tokens. `num_experts`
    defaults to the largest expert id seen + 1.
    """
    weighting = check_weighting(weighting)
    if top_k < 1:
        raise SelectionError(f"top-k must be >= 1, got {top_k}")
    folder = Path(folder)
    files = _log_files(folder) if folder.is_dir() else {}
    if not files:
        raise SelectionError(
            f"{folder} holds no expert_weights_<L>.txt routing logs",
            hint="pass the reference's expert_scores/<task> folder",
        )
    per_layer: dict[int, tuple[list, list]] = {}
    seen_max, counts = -1, {}
    for layer, paths in sorted(files.items()):
        seqs = []
        for path in paths:
            with path.open() as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        ids, w = parse_log_line(line, top_k, where=f"{path}:{n}")
                        seqs.append((ids, w))
                        seen_max = max(seen_max, int(ids.max()))
        per_layer[layer] = seqs
        counts[layer] = (len(seqs), sum(len(ids) // top_k for ids, _ in seqs))
    if len(set(counts.values())) != 1:
        raise SelectionError(
            f"{folder}: layers saw different sequences or tokens: {counts}",
            hint="the logs are incomplete or mix several runs",
        )
    n_experts = num_experts if num_experts is not None else seen_max + 1
    if seen_max >= n_experts:
        raise SelectionError(f"{folder}: expert id {seen_max} out of range for {n_experts} experts")
    sequences, tokens = next(iter(counts.values()))
    token, gate = {}, {}
    for layer, seqs in per_layer.items():
        t_sum = torch.zeros(n_experts, dtype=torch.float64)
        g_sum = torch.zeros(n_experts, dtype=torch.float64)
        for ids, w in seqs:
            length = len(ids) // top_k
            tw = token_weights(torch.ones(1, length, dtype=torch.bool), weighting)[0, 0].item()
            ids_t = torch.from_numpy(ids)
            t_sum.index_add_(0, ids_t, torch.full((len(ids),), tw / top_k, dtype=torch.float64))
            g_sum.index_add_(0, ids_t, torch.from_numpy(w) * tw)
        kw = dict(sequences=sequences, tokens=tokens, weighting=weighting)
        token[layer] = finish_scores(t_sum, **kw)
        gate[layer] = finish_scores(g_sum, **kw)
    return ReferenceLogScores(
        token=token,
        gate=gate,
        top_k=top_k,
        num_experts=n_experts,
        tokens=tokens,
        sequences=sequences,
        weighting=weighting,
        source=str(folder),
    )
