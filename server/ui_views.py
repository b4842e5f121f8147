"""What each page of the web view shows (`expertlib.server.ui`), built from the library: the registry's
entries and stored evaluation results, `Registry.diff` (the code behind `expertlib diff`), and the
server's Prometheus collectors (the numbers `/metrics` renders)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from expertlib.registry import Registry
from expertlib.registry.evals import RETENTION_TASK, evals_of, score_table


def _full(reg) -> Registry:
    """A `Registry` (diff, evals) over the same folder when the app was given a bare store."""
    if isinstance(reg, Registry):
        return reg
    return Registry(reg.root, read_only=reg.read_only, busy_timeout=reg.busy_timeout_ms / 1000)


def sets_view(reg) -> dict:
    """Every name with its versions (newest first), tags and recorded scores."""
    reg = _full(reg)
    entries = reg.list()
    evals = evals_of(reg, entries)
    groups: dict[tuple[str, str], dict] = {}
    for e in entries:
        g = groups.setdefault(
            (e.base_key, e.name),
            {"name": e.name, "base": e.base.name or e.base.model_type, "versions": []},
        )
        g["versions"].insert(0, {"entry": e, "scores": evals[e.ref]})
    return {"title": "Expert sets", "groups": list(groups.values()), "root": str(reg.root)}


def set_view(reg, ref: str) -> dict:
    """One version: manifest, provenance, experts per layer, and the scores of every version of its name."""
    reg = _full(reg)
    entry = reg.show(ref)
    m = entry.manifest
    versions = reg.list(base=entry.base, name=entry.name)
    results = evals_of(reg, versions)
    measured = {r: recs for r, recs in results.items() if recs}
    rows, values = score_table(measured)
    columns = sorted(measured, key=lambda r: r.version)
    p = m.provenance
    provenance = [
        ("method", p.method),
        ("score function", p.score_function),
        ("top-p", p.top_p),
        ("max experts per layer", p.max_experts_per_layer),
        ("tokens scored", p.tokens_scored),
        ("training data digest", p.data_digest),
        ("steps", p.steps),
        ("final train loss", p.final_train_loss),
        ("final eval loss", p.final_eval_loss),
        ("trainable parameters", p.trainable_params),
        ("wall time (s)", p.wall_time_s),
        ("trains shared experts", p.train_shared_experts),
        ("trains non-expert modules", p.train_non_expert_modules),
    ]
    others = [v for v in versions if v.version != entry.version]
    return {
        "title": str(entry.ref),
        "entry": entry,
        "manifest": m,
        "provenance": [(k, v) for k, v in provenance if v is not None],
        "training": sorted(p.training.items()),
        "retention": _retention(p.extra, results[entry.ref]),
        "score_rows": rows,
        "score_columns": columns,
        "score_values": values,
        "others": others,
        "previous": max(
            (v for v in others if v.version < entry.version), key=lambda v: v.version, default=None
        ),
        "manifest_json": json.dumps(m.model_dump(mode="json"), indent=2),
    }


def _retention(extra: dict, records) -> dict | None:
    """The retention risk: the manifest's own (`provenance.extra["retention_risk"]`), else recorded."""
    risk = extra.get("retention_risk")
    if isinstance(risk, dict):
        return {k: risk[k] for k in ("mean_general_mass", "max_general_mass", "at_risk_layers") if k in risk}
    found = {r.metric: r.value for r in records if r.task == RETENTION_TASK}
    return found or None


def diff_view(reg, refs: list[str], heatmap: Callable[[Any], str]) -> dict:
    """`expertlib diff` of `refs`, and its heatmap (`heatmap(report)`: an image URI)."""
    report = _full(reg).diff(refs)
    return {"title": "Diff " + " vs ".join(report.labels), "report": report, "heatmap": heatmap(report)}


def live_view(state) -> dict:
    """The server's state as `/metrics` reports it: the same collectors, read the same way."""
    state.refresh_metrics()
    gauges: dict[str, float] = {}
    per_set: dict[str, dict[str, float]] = {}

    def row(model: str) -> dict[str, float]:
        return per_set.setdefault(
            model,
            {
                "requests": 0,
                "errors": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "loads": 0,
                "evictions": 0,
            },
        )

    for family in state.metrics.registry.collect():
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                gauges[s.name] = s.value
            elif s.name == "expertlib_requests_total":
                row(model)["requests"] += s.value
                if not s.labels.get("status", "").startswith("2"):
                    row(model)["errors"] += s.value
            elif s.name in ("expertlib_prompt_tokens_total", "expertlib_completion_tokens_total"):
                row(model)[s.name.removeprefix("expertlib_").removesuffix("_total")] += s.value
            elif s.name == "expertlib_set_residency" and s.value == 1:
                row(model)["where"] = s.labels["where"]
            elif s.name == "expertlib_set_loads_total":
                row(model)["loads"] += s.value
                row(model)[f"loads_{s.labels['source']}"] = s.value
            elif s.name == "expertlib_set_evictions_total":
                row(model)["evictions"] = s.value
            elif s.name == "expertlib_set_load_seconds_total":
                row(model)["load_seconds"] = s.value
    sets = sorted(per_set.items(), key=lambda kv: (kv[1].get("where") != "slots", kv[0]))
    return {
        "title": "Live state",
        "base": state.settings.model_name,
        "ready": bool(gauges.get("expertlib_ready", 0)),
        "gauges": gauges,
        "sets": sets,
        "resident": [name for name, r in sets if r.get("where") == "slots"],
    }
