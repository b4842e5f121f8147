"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can coexist).

Per expert set (label `model`: the set's served name, `base` for the base model): requests by
endpoint and status, prompt and completion tokens, end-to-end latency, and, read from the engine at
each scrape, where the set is (`expertlib_set_residency{where="slots|host|disk"}`), its loads (by
source: host cache or disk), evictions and load time. Scrape it with Prometheus:

    scrape_configs:
      - job_name: expertlib
        static_configs: [{targets: ["127.0.0.1:8000"]}]     # GET /metrics

It also exports the routing signal Kubernetes inference gateways (Gateway API Inference Extension /
llm-d, KServe) read from vLLM, `vllm:lora_requests_info`, with expert sets in place of LoRA
adapters: labels `max_lora` (sets the slots hold at once), `running_lora_adapters` (the sets
resident in the slots, comma-separated served names) and `waiting_lora_adapters` (the sets being
loaded for waiting requests); the value is the time of the scrape (the gateway keeps the newest
series). The model-server protocol defines `running` as "loaded and ready to serve", which is what
a gateway's set affinity needs: a pod holding an idle set answers it without a load.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RESIDENCY = ("slots", "host", "disk")
#: vLLM's LoRA gauge and its label names (vllm/v1/metrics/loggers.py), read by inference gateways.
LORA_INFO = "vllm:lora_requests_info"
LORA_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")


class ServerMetrics:
    """Requests, tokens and latency per expert set (`model` label: the set's name, or the base)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "expertlib_requests",
            "Inference requests by model, endpoint and HTTP status",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.auto_decisions = Counter(
            "expertlib_auto_decisions",
            'model="auto" requests by the set chosen to serve them (the base: its name)',
            ["model"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "expertlib_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "expertlib_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.latency = Histogram(
            "expertlib_request_latency_seconds",
            "End-to-end request latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "expertlib_queue_depth", "Inference requests admitted and not finished", registry=r
        )
        self.queue_limit = Gauge(
            "expertlib_queue_limit", "Most inference requests admitted at once", registry=r
        )
        self.slots_used = Gauge(
            "expertlib_slots_used", "Expert slots in use in the fullest MoE layer", registry=r
        )
        self.slots_total = Gauge("expertlib_slots_total", "Expert slots per MoE layer", registry=r)
        self.sets_loaded = Gauge("expertlib_sets_loaded", "Expert sets loaded in the engine", registry=r)
        self.ready = Gauge("expertlib_ready", "1 when the server accepts inference requests", registry=r)
        self.load_latency = Histogram(
            "expertlib_set_load_latency_seconds",
            "Time to load an expert set into the slots (from the host cache or from disk)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self._sets = _SetCollector()
        r.register(self._sets)

    def observe_load(self, name: str, seconds: float) -> None:
        self.load_latency.labels(model=name).observe(seconds)

    def watch(self, state: Any) -> None:
        """Read per-set residency, loads and evictions from this server's engine at each scrape."""
        self._sets.state = state

    def observe_engine(self, status: dict, loaded: int) -> None:
        self.sets_loaded.set(loaded)
        used, total = slot_counts(status)
        if used is not None:
            self.slots_used.set(used)
        if total is not None:
            self.slots_total.set(total)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def slot_counts(status: dict) -> tuple[int | None, int | None]:
    """(used, total) slots per MoE layer from an engine status (used: the fullest layer)."""
    used = status.get("slots_used")
    if isinstance(used, dict):
        used = max(used.values(), default=0)
    total = status.get("slots_per_layer", status.get("slots"))
    return (used if isinstance(used, int) else None), (total if isinstance(total, int) else None)


class _SetCollector:
    """Series read from the engine's per-set history when scraped (the engine owns those counts)."""

    def __init__(self) -> None:
        self.state: Any = None

    def describe(self):
        return []

    def collect(self):
        residency = GaugeMetricFamily(
            "expertlib_set_residency",
            "1 where an expert set is: slots (resident), host (host-memory cache) or disk (registry)",
            labels=["model", "where"],
        )
        loads = CounterMetricFamily(
            "expertlib_set_loads", "Expert set loads into the slots, by source", labels=["model", "source"]
        )
        evictions = CounterMetricFamily(
            "expertlib_set_evictions", "Expert sets evicted from the slots to make room", labels=["model"]
        )
        seconds = CounterMetricFamily(
            "expertlib_set_load_seconds", "Seconds spent loading each expert set", labels=["model"]
        )
        for name, h in _history(self.state).items():
            where = h.get("residency", "disk")
            for w in RESIDENCY:
                residency.add_metric([name, w], 1.0 if w == where else 0.0)
            cached = float(h.get("cache_loads", 0))
            loads.add_metric([name, "host"], cached)
            loads.add_metric([name, "disk"], float(h.get("loads", 0)) - cached)
            evictions.add_metric([name], float(h.get("evictions", 0)))
            seconds.add_metric([name], float(h.get("load_seconds", 0.0)))
        yield from (residency, loads, evictions, seconds)
        prepacker = getattr(self.state, "prepacker", None)
        if prepacker is not None:
            st = prepacker.status()
            for what, help_text in (
                ("sets", "Expert sets packed ahead of their first request into the packed-set disk cache"),
                ("bytes", "Bytes of expert sets packed ahead of their first request"),
                ("pending", "Registered expert sets waiting to be packed ahead"),
            ):
                family = GaugeMetricFamily(f"expertlib_prepack_{what}", help_text)
                family.add_metric([], float(st["packed" if what == "sets" else what]))
                yield family
        info = lora_info(self.state)
        if info is not None:
            lora = GaugeMetricFamily(LORA_INFO, "Running stats on lora requests.", labels=list(LORA_LABELS))
            max_sets, waiting, running = info
            lora.add_metric([str(max_sets), ",".join(waiting), ",".join(running)], time.time())
            yield lora


#: a replica that has not reported for this long (it reports every few seconds while alive) is gone
REPLICA_STALE_S = 60.0


def render_replicas(replicas: dict[str, dict], *, now: float | None = None) -> bytes:
    """Prometheus text of every replica's own counters (`serve --replicas`, `expertlib.server.replicas`):
    requests naming a set by whether the replica already held it (`resident="yes"`) or loaded it for
    the request (`"no"`), its resident sets, its loads and Ray's evictions, each labelled `replica`.
    Replicas whose last report (`time`) is older than REPLICA_STALE_S are left out (a dead one's
    series end)."""
    now = time.time() if now is None else now
    replicas = {r: c for r, c in replicas.items() if now - c.get("time", now) <= REPLICA_STALE_S}

    class Replicas:
        def describe(self):
            return []

        def collect(self):
            requests = CounterMetricFamily(
                "expertlib_replica_requests",
                "Requests naming an expert set, by replica and whether the set was resident there on arrival",
                labels=["replica", "model", "resident"],
            )
            sets = GaugeMetricFamily(
                "expertlib_replica_sets_loaded", "Expert sets resident on the replica", labels=["replica"]
            )
            loads = CounterMetricFamily(
                "expertlib_replica_loads",
                "Expert sets loaded for requests on the replica",
                labels=["replica"],
            )
            evictions = CounterMetricFamily(
                "expertlib_replica_evictions",
                "Expert sets Ray's multiplexer evicted from the replica (least recently used)",
                labels=["replica"],
            )
            for replica, c in sorted(replicas.items()):
                for model, counts in sorted(c.get("requests", {}).items()):
                    for resident in ("yes", "no"):
                        requests.add_metric([replica, model, resident], float(counts.get(resident, 0)))
                sets.add_metric([replica], float(len(c.get("sets", []))))
                loads.add_metric([replica], float(c.get("loads", 0)))
                evictions.add_metric([replica], float(c.get("evictions", 0)))
            yield from (requests, sets, loads, evictions)

    registry = CollectorRegistry()
    registry.register(Replicas())
    return generate_latest(registry)


def lora_info(state: Any) -> tuple[int, list[str], list[str]] | None:
    """(max_lora, waiting, running) as vLLM's `vllm:lora_requests_info` labels them: the sets the
    slots hold at once, the sets being loaded, the sets resident (served names); None before the
    engine runs."""
    engine = getattr(state, "engine", None)
    catalog = getattr(state, "catalog", None)
    if engine is None or catalog is None:
        return None
    try:
        status = dict(engine.status())
        running = list(catalog.loaded())
        waiting = catalog.loading()
    except Exception:  # noqa: BLE001 - a scrape never fails on engine trouble
        return None
    max_sets = status.get("max_sets")
    return (max_sets if isinstance(max_sets, int) else len(running)), waiting, running


def _history(state: Any) -> dict[str, dict]:
    """Per set: the engine's history (loads, evictions, residency), plus registered sets on disk."""
    engine = getattr(state, "engine", None)
    catalog = getattr(state, "catalog", None)
    if engine is None:
        return {}
    try:
        status = dict(engine.status())
    except Exception:  # noqa: BLE001 - a scrape never fails on engine trouble
        return {}
    out = {n: dict(h) for n, h in (status.get("history") or {}).items()}
    for name in status.get("sets", {}) or {}:
        out.setdefault(name, {"loads": 1})["residency"] = "slots"
    if catalog is not None:
        for reg in catalog.registered():
            out.setdefault(str(reg), {"residency": "disk"})
    return out
