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
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from expertlib.errors import InvalidNameError
from expertlib.registry import index
from expertlib.registry.local import BaseArg, RegistryStore
from expertlib.registry.names import Ref
from expertlib.registry.protocol import LABEL_HINT, Entry, EvalRecord

#: The task name under which a set's retention risk is kept (`expertlib.esft.diagnostics.RetentionRisk`:
#: the share of a general dataset's routing its experts carry; metrics mean_general_mass, max_general_mass).
RETENTION_TASK = "retention"

__all__ = ["RETENTION_TASK", "EvalRecord", "record_evals", "evals_of", "with_evals", "merge_evals"]


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
        raise InvalidNameError(f"cannot record these scores: {exc}", hint=LABEL_HINT) from None


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


def with_evals(reg: RegistryStore, entries: Sequence[Entry]) -> list[Entry]:
    """The entries with their stored results attached (`Entry.evals`): what a registry lists to
    another one, so a push or pull carries a version's scores with its bytes."""
    results = evals_of(reg, entries)
    return [e.model_copy(update={"evals": results[e.ref]}) for e in entries]


def merge_evals(have: Sequence[EvalRecord], new: Sequence[EvalRecord]) -> list[EvalRecord]:
    """`have` with `new` recorded over it: the same (task, metric, data digest) is replaced, as
    `record_evals` does in an index (for remotes that keep results beside the entry)."""
    merged = {(r.task, r.metric, r.data_digest): r for r in [*have, *new]}
    return [merged[k] for k in sorted(merged)]


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
