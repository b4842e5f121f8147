"""The routing signal Kubernetes inference gateways read: `vllm:lora_requests_info` on /metrics, with
expert sets as the adapters. Each scrape is parsed with prometheus_client's parser and read the way
the Gateway API Inference Extension's endpoint picker reads vLLM (the newest series with a non-empty
adapter list; comma-separated names), then scored with its lora-affinity rule: set resident 1.0,
room left 0.8, set waiting 0.6, full 0. The pod holding a set must win.

Two real apps on real ports over the in-process engine double (a load can be held open to see the
set waiting), and one real `expertlib serve` on the vLLM engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port
from test_server_http import FakeEngine, ServerThread, _patch_file

from expertlib.registry import Registry
from expertlib.server import ServerSettings, create_app

MAX_SETS = 2


# --- the gateway's side, re-implemented ---------------------------------------------------------


def scrape(url: str) -> dict:
    """What the endpoint picker keeps from one scrape: running and waiting adapters and max_lora,
    from the `vllm:lora_requests_info` series with the newest value (a timestamp)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    latest = None
    for family in text_string_to_metric_families(text):
        if family.name != "vllm:lora_requests_info":
            continue
        for s in family.samples:
            if not (s.labels.get("running_lora_adapters") or s.labels.get("waiting_lora_adapters")):
                continue  # the picker skips series with both lists empty
            if latest is None or s.value > latest.value:
                latest = s
    assert latest is not None, "no vllm:lora_requests_info series with adapters:\n" + text

    def names(label: str) -> set[str]:
        value = latest.labels.get(label, "")
        return set(value.split(",")) if value else set()

    return {
        "running": names("running_lora_adapters"),
        "waiting": names("waiting_lora_adapters"),
        "max": int(latest.labels["max_lora"]),
        "timestamp": latest.value,
    }


def lora_affinity(pod: dict, model: str) -> float:
    """The lora-affinity scorer: resident 1.0, room left 0.8, waiting 0.6, full 0."""
    if model in pod["running"]:
        return 1.0
    if len(pod["running"]) + len(pod["waiting"]) < pod["max"]:
        return 0.8
    if model in pod["waiting"]:
        return 0.6
    return 0.0


def pick(pods: dict[str, dict], model: str) -> str:
    scores = {name: lora_affinity(pod, model) for name, pod in pods.items()}
    best = max(scores.values())
    winners = [n for n, s in scores.items() if s == best]
    assert len(winners) == 1, f"no single winner for {model}: {scores}"
    return winners[0]


# --- two pods over the engine double --------------------------------------------------------------


class HeldEngine(FakeEngine):
    """The engine double with the real engine's `max_sets` in its status, whose loads can be held."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.release.set()

    async def load(self, es, name=None, pin=False) -> str:
        await asyncio.to_thread(self.release.wait, 60)
        return await super().load(es, name=name, pin=pin)

    def status(self):
        return {**super().status(), "max_sets": MAX_SETS}


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    reg = Registry(root / "registry")
    for task in ("alpha", "beta", "gamma"):
        reg.publish(_patch_file(root / f"{task}.safetensors", task))
    out = {}
    with ServerThread(*_app(root, "alpha", out)), ServerThread(*_app(root, "beta", out)):
        for pod in out.values():
            deadline = time.time() + 30
            while httpx.get(pod["url"] + "/health").status_code != 200:
                assert time.time() < deadline, "pod not ready"
                time.sleep(0.05)
        yield out


def _app(root: Path, first: str, out: dict):
    engine = HeldEngine()
    settings = ServerSettings(
        base="tiny-base", registry=str(root / "registry"), expert_sets=[first], max_sets=MAX_SETS
    )
    port = free_port()
    out[first] = {"url": f"http://127.0.0.1:{port}", "engine": engine}
    return create_app(settings, engine_factory=lambda _s: engine), port


def test_the_pod_holding_a_set_wins(pods):
    seen = {name: scrape(pod["url"]) for name, pod in pods.items()}
    assert seen["alpha"]["running"] == {"alpha@1"} and seen["beta"]["running"] == {"beta@1"}
    assert seen["alpha"]["waiting"] == set() and seen["alpha"]["max"] == MAX_SETS
    assert abs(seen["alpha"]["timestamp"] - time.time()) < 60  # the value is a unix time, as vLLM's
    assert pick(seen, "alpha@1") == "alpha"
    assert pick(seen, "beta@1") == "beta"


def test_a_set_being_loaded_is_waiting_then_running(pods):
    pod = pods["beta"]
    pod["engine"].release.clear()  # the next load on this pod is held open
    answer = {}

    def request():
        body = {"model": "gamma@1", "prompt": "hi", "max_tokens": 2}
        answer["r"] = httpx.post(pod["url"] + "/v1/completions", json=body, timeout=60)

    t = threading.Thread(target=request)
    t.start()
    try:
        deadline = time.time() + 30
        while "gamma@1" not in (during := scrape(pod["url"]))["waiting"]:
            assert time.time() < deadline, f"gamma never showed as waiting: {during}"
            time.sleep(0.05)
        assert during["running"] == {"beta@1"}
        seen = {"alpha": scrape(pods["alpha"]["url"]), "beta": during}
        # beta's pod has no room (one set resident, one loading); alpha's has: it wins gamma
        assert lora_affinity(during, "gamma@1") == 0.6
        assert pick(seen, "gamma@1") == "alpha"
    finally:
        pod["engine"].release.set()
        t.join(30)
    assert answer["r"].status_code == 200, answer["r"].text
    after = scrape(pod["url"])
    assert after["running"] == {"beta@1", "gamma@1"} and after["waiting"] == set()
    assert after["timestamp"] >= during["timestamp"]  # the newest series is the current one
    seen = {"alpha": scrape(pods["alpha"]["url"]), "beta": after}
    assert pick(seen, "gamma@1") == "beta"
    assert lora_affinity(after, "delta@1") == 0.0  # full: a new set goes to the pod with room
    assert pick(seen, "delta@1") == "alpha"


# --- one real server on the vLLM engine -------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_real_server_exports_the_gauge(tmp_path):
    pytest.importorskip("vllm")
    from served_world import build, serve

    base_dir, _ = build(tmp_path)
    with serve(tmp_path, base_dir) as url:  # alpha and beta loaded, --max-sets 4
        pod = scrape(url)
        assert pod["running"] == {"alpha@1", "beta@1"} and pod["waiting"] == set()
        assert pod["max"] == 4
        assert lora_affinity(pod, "alpha@1") == 1.0 and lora_affinity(pod, "other@1") == 0.8
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert scrape(url)["running"] == {"alpha@1", "beta@1"}
