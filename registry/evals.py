"""Evaluation results kept with the version they measure: task, metric, value, data digest, date.

    reg.record_evals("sum@2", [EvalRecord(task="sum", metric="exact_match", value=1.0,
                                          data_digest=examples_digest(pairs), n=50)])
    reg.evals("sum")            # {Ref(sum@1): [...], Ref(sum@2): [...]}: versions side by side

Rows live in the registry index (table `evals`, keyed by the version and by task, metric and data
digest: measuring the same thing again replaces the value, measuring it on other data adds a row);
removing a version removes its results. `expertlib eval --record`, the demo and the web view use
these functions; `expertlib list` and `show` print them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from pydantic import BaseModel, Field, field_validator

from expertlib.errors import InvalidNameError
from expertlib.registry import index
from expertlib.registry.local import BaseArg, RegistryStore
from expertlib.registry.models import Entry
from expertlib.registry.names import Ref

#: The task name under which a set's retention risk is kept (`expertlib.esft.diagnostics.RetentionRisk`:
#: the share of a general dataset's routing its experts carry; metrics mean_general_mass, max_general_mass).
RETENTION_TASK = "retention"

#: Task and metric names: short printable labels (they end up in tables, the web view, Hub cards).
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/+()-]{0,99}$")
_LABEL_HINT = "use letters, digits, spaces and . _ : / + ( ) - (at most 100 characters)"


class EvalRecord(BaseModel):
    """One measured score of one expert-set version."""

    task: str = Field(description="what was measured, e.g. the toy task `sum` or a data file's name")
    metric: str = Field(description="exact_match, contains, answer_loss, perplexity, ...")
    value: float = Field(description="the score (finite)")
    data_digest: str = Field(default="", description="sha256 of the evaluation data ('' when unknown)")
    n: int | None = Field(default=None, ge=0, description="samples evaluated")
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    source: str | None = Field(default=None, description="what measured it (expertlib eval, demo, ...)")

    @field_validator("task", "metric")
    @classmethod
    def _label(cls, v: str) -> str:
        if not isinstance(v, str) or not _LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid label: {_LABEL_HINT}")
        return v

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"score {v} is not finite")
        return v

    @field_validator("data_digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if v and not re.match(r"^sha256:[0-9a-f]{64}$", v):
            raise ValueError(f"data digest {v!r} is not sha256:<64 hex digits>")
        return v


def examples_digest(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over (prompt, answer) pairs in order: names evaluation data that is not one file."""
    h = hashlib.sha256()
    for prompt, answer in pairs:
        h.update(json.dumps([prompt, answer], ensure_ascii=False).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def make_records(
    scores: dict[str, dict[str, float]],
    *,
    data_digests: dict[str, str] | None = None,
    n: dict[str, int] | None = None,
    source: str | None = None,
) -> list[EvalRecord]:
    """Records from {task: {metric: value}} (one timestamp for all); InvalidNameError on a bad label."""
    now = datetime.now(timezone.utc)
    try:
        return [
            EvalRecord(
                task=task,
                metric=metric,
                value=float(value),
                data_digest=(data_digests or {}).get(task, ""),
                n=(n or {}).get(task),
                recorded_at=now,
                source=source,
            )
            for task, metrics in scores.items()
            for metric, value in metrics.items()
        ]
    except ValueError as exc:
        raise InvalidNameError(f"cannot record these scores: {exc}", hint=_LABEL_HINT) from None


def accuracy_records(
    accuracy: dict[str, float],
    samples: dict[str, list[dict]],
    *,
    metric: str = "exact_match",
    source: str | None = None,
) -> list[EvalRecord]:
    """Records of one model's per-task accuracy; each task's data digest is taken over the samples it
    was measured on ({"prompt", "answer"} dicts, e.g. `expertlib.demo.evaluate.EvalResult.samples`)."""
    return make_records(
        {task: {metric: value} for task, value in accuracy.items()},
        data_digests={t: examples_digest((d["prompt"], d["answer"]) for d in samples[t]) for t in accuracy},
        n={t: len(samples[t]) for t in accuracy},
        source=source,
    )


def retention_records(summary: dict, *, source: str | None = None) -> list[EvalRecord]:
    """Records of a retention-risk check (`RetentionRisk.summary()`): mean and max general mass."""
    return make_records(
        {RETENTION_TASK: {k: summary[k] for k in ("mean_general_mass", "max_general_mass")}}, source=source
    )


def record_evals(
    reg: RegistryStore, ref: str | Ref, records: Sequence[EvalRecord], *, base: BaseArg = None
) -> Entry:
    """Store `records` with the version `ref` names (one transaction); returns that entry."""
    reg._writable()
    entry = reg.resolve(ref, base=base)
    con = reg._con()
    try:
        with index.transaction(con):
            for r in records:
                con.execute(
                    "INSERT OR REPLACE INTO evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry.base_key,
                        entry.name,
                        entry.version,
                        r.task,
                        r.metric,
                        r.data_digest,
                        r.value,
                        r.n,
                        r.recorded_at.isoformat(),
                        r.source,
                    ),
                )
    finally:
        con.close()
    return entry


def evals_of(reg: RegistryStore, entries: Sequence[Entry]) -> dict[Ref, list[EvalRecord]]:
    """The stored results of each entry (ordered by task, metric), keyed by its ref."""
    out: dict[Ref, list[EvalRecord]] = {e.ref: [] for e in entries}
    if not entries:
        return out
    by_key = {(e.base_key, e.name, e.version): e.ref for e in entries}
    con = reg._con()
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'evals'").fetchone():
            return out  # a read-only index from before schema 2: no results stored
        names = sorted({(e.base_key, e.name) for e in entries})
        where = " OR ".join("(base_key = ? AND name = ?)" for _ in names)
        rows = con.execute(
            f"SELECT * FROM evals WHERE {where} ORDER BY task, metric, data_digest, version",
            [x for pair in names for x in pair],
        ).fetchall()
    finally:
        con.close()
    for r in rows:
        ref = by_key.get((r["base_key"], r["name"], r["version"]))
        if ref is not None:
            out[ref].append(
                EvalRecord(
                    task=r["task"],
                    metric=r["metric"],
                    value=r["value"],
                    data_digest=r["data_digest"],
                    n=r["n"],
                    recorded_at=datetime.fromisoformat(r["recorded_at"]),
                    source=r["source"],
                )
            )
    return out


def score_table(
    results: dict[Ref, list[EvalRecord]],
) -> tuple[list[tuple[str, str, str]], dict[Ref, dict[tuple[str, str, str], float]]]:
    """Versions side by side: the (task, metric, data digest) rows any version has, and per version
    its value on each row (absent where it was not measured)."""
    rows = sorted({(r.task, r.metric, r.data_digest) for recs in results.values() for r in recs})
    values = {
        ref: {(r.task, r.metric, r.data_digest): r.value for r in recs} for ref, recs in results.items()
    }
    return rows, values


def brief(records: Sequence[EvalRecord], limit: int = 3) -> str:
    """'sum exact_match 1.00, ...' for a listing column (the first `limit`, then how many more)."""
    parts = [f"{r.task} {r.metric} {r.value:.4g}" for r in records[:limit]]
    if len(records) > limit:
        parts.append(f"+{len(records) - limit} more")
    return ", ".join(parts)
