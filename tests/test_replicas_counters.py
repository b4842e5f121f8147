"""The replicas' counters without Ray: the hit rate between two snapshots, the /metrics rendering,
and a replica that stopped reporting (its process died) leaving /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from expertlib.server.metrics import REPLICA_STALE_S, render_replicas
from expertlib.server.replicas import hit_rate, model_of


def test_hit_rate_counts_only_the_requests_between_two_snapshots():
    before = {"r1": {"requests": {"a": {"yes": 10, "no": 1}}}}
    after = {
        "r1": {"requests": {"a": {"yes": 30, "no": 1}, "b": {"yes": 0, "no": 1}}},
        "r2": {"requests": {"c": {"yes": 9, "no": 0}}},  # started in between: all of it counts
    }
    assert hit_rate(before, after) == (29, 30)
    assert hit_rate(after, after) == (0, 0)


def test_a_replica_that_stopped_reporting_leaves_metrics():
    now = 1_000_000.0
    text = render_replicas(
        {
            "alive": {"requests": {"a": {"yes": 3, "no": 1}}, "sets": ["a@1"], "time": now - 5},
            "dead": {
                "requests": {"a": {"yes": 7, "no": 0}},
                "sets": ["a@1"],
                "time": now - REPLICA_STALE_S - 1,
            },
        },
        now=now,
    ).decode()
    replicas = {
        s.labels["replica"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "replica" in s.labels
    }
    assert replicas == {"alive"}


def test_the_router_reads_the_model_of_inference_routes_only():
    assert model_of("/v1/completions", b'{"model": "math@1", "prompt": "x"}') == "math@1"
    assert model_of("/v1/chat/completions", b'{"model": "code"}') == "code"
    assert model_of("/v1/models", b'{"model": "math"}') is None
    assert model_of("/v1/completions", b"not json") is None
    assert model_of("/v1/completions", b'{"model": 3}') is None
    assert model_of("/v1/completions", b"[1, 2]") is None
