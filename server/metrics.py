"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
