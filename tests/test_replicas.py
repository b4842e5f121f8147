"""`expertlib serve --replicas 2` on a local Ray (2 CPUs): two CPU vLLM engines of a tiny base under
Ray Serve, the set router in front, `--max-sets 2` per replica with one set pinned (`--pin gamma`: on
both replicas, outside Ray's multiplexer, so each replica's multiplexer holds one other set), and
`--pull-from` a bucket on moto's S3 server (a registry folder without moto) holding `delta`, which
the replicas' registry does not.

Requests of one set land on one replica (the replica id comes back in a header), both replicas serve,
answers are the transformers reference's greedy tokens (which the single-engine server is held to in
test_openai_api.py), a streamed answer streams, and errors keep their OpenAI shape through the router.
After warm-up >= 95% of requests for a set land on a replica already holding it, counted by the
replicas themselves and read from /metrics through the router (behind the metrics key). A replica
whose multiplexer is full evicts its least recently used set without failing a request, and the
first request for `delta` pulls it from the remote; a set on neither is a 404. Last, one
replica's process is killed mid-stream: the stream ends at once with an error event, the other
replica answers, Ray starts a replacement, and the set is answered again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest
from server_process import TEST_ENV, free_port
from test_objectstore import s3_url  # noqa: F401 - the fixture

pytest.importorskip("vllm")
pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The cat sat on"
MORE = {"gamma": {0: [0, 4], 1: [2, 3]}, "delta": {0: [5, 6], 1: [4]}}  # beside served_world's alpha, beta
METRICS_KEY = "scrape-key"


@pytest.fixture(scope="module")
def remote(request, tmp_path_factory) -> str:
    """Where --pull-from points: a bucket on moto's S3 server (its address in the environment, which
    the Ray workers inherit), or a registry folder where moto or s3fs is not installed."""
    try:
        return request.getfixturevalue("s3_url") + "-replicas"
    except pytest.skip.Exception:
        return str(tmp_path_factory.mktemp("remote") / "registry")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, remote):
    import ray
    from ray import serve
    from served_world import BASE_NAME, CTX, SCALE, Reference, build

    from expertlib.moe import load_model
    from expertlib.registry import Registry
    from expertlib.server import ServerSettings
    from expertlib.server.replicas import serve_replicated
    from expertlib.vllm_plugin.testing import random_expert_set

    root = tmp_path_factory.mktemp("replicas")
    base_dir, sets = build(root)
    model = load_model(base_dir)
    for i, (name, experts) in enumerate(MORE.items()):
        sets[name] = random_expert_set(model, name, experts, seed=10 + i, scale=SCALE)
        reg = Registry(root / ("pushed" if name == "delta" else "registry"))  # delta: on the remote only
        reg.publish(sets[name].save(root / f"{name}.safetensors"), base=base_dir)
    Registry(root / "pushed").push("delta", remote)
    del model
    saved = dict(os.environ)
    os.environ.update(TEST_ENV)  # the replicas' engines: in-process core, offline
    port = free_port()
    settings = ServerSettings(
        base=str(base_dir),
        served_name=BASE_NAME,
        registry=str(root / "registry"),
        slots=8,
        max_sets=2,
        pins=["gamma"],
        pull_from=remote,
        metrics_key=METRICS_KEY,
        kv_cache_memory=64 << 20,
        max_model_len=CTX,
        port=port,
        engine_args={"enforce_eager": True, "dtype": "float32", "max_num_seqs": 4},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_replicated(settings, 2, block=False)
        ref = Reference(base_dir, sets)
        ids = ref.tok.encode(PROMPT)
        expected = {name: ref.tok.decode(ref.greedy(ids, name, 4)) for name in sets}
        yield {"url": f"http://127.0.0.1:{port}", "ref": ref, "expected": expected, "root": root}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def complete(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def answered(url: str, model: str) -> tuple[str, str]:
    """(replica, text) of a 200 answer."""
    from expertlib.server.replicas import REPLICA_HEADER

    r = complete(url, model)
    assert r.status_code == 200, (model, r.text)
    return r.headers[REPLICA_HEADER], r.json()["choices"][0]["text"]


def replica_counters(url: str) -> dict[str, dict[str, dict[str, float]]]:
    """replica -> model -> {"yes": hits, "no": misses}, from /metrics through the router."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    out: dict = {}
    for family in text_string_to_metric_families(r.text):
        if family.name == "expertlib_replica_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    labels = s.labels
                    out.setdefault(labels["replica"], {}).setdefault(labels["model"], {})[
                        labels["resident"]
                    ] = s.value
    return out


def test_a_set_sticks_to_one_replica_and_both_serve(cluster):
    url, expected = cluster["url"], cluster["expected"]
    placed: dict[str, set[str]] = {"alpha": set(), "beta": set()}
    for model in ("alpha", "beta"):
        replica, text = answered(url, model)
        placed[model].add(replica)
        assert text == expected[model], model
        time.sleep(3)  # Ray's routers learn which replica holds the set (pushed by the replica)
    for _ in range(4):
        for model in ("alpha", "beta"):
            replica, text = answered(url, model)
            placed[model].add(replica)
            assert text == expected[model], model
    assert len(placed["alpha"]) == 1 and len(placed["beta"]) == 1, placed  # every request to its holder
    assert placed["alpha"] != placed["beta"], placed  # the second set went to the empty replica


def test_after_warm_up_95_percent_land_on_a_replica_holding_the_set(cluster):
    url, expected = cluster["url"], cluster["expected"]
    before = replica_counters(url)
    assert len(before) == 2, before  # both replicas report
    sent = 0
    for _ in range(8):
        for model in ("alpha", "beta", "gamma"):  # gamma: pinned, any replica
            assert answered(url, model)[1] == expected[model]
            sent += 1
    after = replica_counters(url)
    hits = total = 0
    for replica, models in after.items():
        for model, counts in models.items():
            old = before.get(replica, {}).get(model, {})
            hits += counts.get("yes", 0) - old.get("yes", 0)
            total += counts.get("yes", 0) + counts.get("no", 0) - old.get("yes", 0) - old.get("no", 0)
    assert total == sent, (total, sent)
    assert hits / total >= 0.95, (hits, total, after)
    gamma_on = {r for r, models in after.items() if models.get("gamma", {}).get("yes", 0) > 0}
    assert len(gamma_on) == 2, after  # the pinned set is answered by both replicas, both holding it


def test_metrics_through_the_router_need_the_key_and_carry_every_replica(cluster):
    url = cluster["url"]
    r = httpx.get(url + "/metrics", timeout=60)
    assert r.status_code == 401 and "expertlib_replica_requests" not in r.text
    counters = replica_counters(url)
    assert len(counters) == 2 and all("alpha" in m or "beta" in m for m in counters.values()), counters


def test_a_full_replica_evicts_its_least_recently_used_set_without_failing(cluster):
    from expertlib.registry import Registry
    from expertlib.server.replicas import replica_stats

    url, expected = cluster["url"], cluster["expected"]
    evictions = sum(c["evictions"] for c in replica_stats().values())
    assert "delta" not in {e.name for e in Registry(cluster["root"] / "registry").list()}
    for model in ("delta", "alpha", "beta", "delta", "alpha"):  # three unpinned sets, room for two
        assert answered(url, model)[1] == expected[model], model
        time.sleep(1)
    stats = replica_stats()
    assert sum(c["evictions"] for c in stats.values()) > evictions, stats
    assert "delta" in {e.name for e in Registry(cluster["root"] / "registry").list()}  # pulled on demand
    for c in stats.values():
        assert "gamma@1" in c["sets"] and len(c["sets"]) <= 2, stats  # pinned: never evicted


def test_concurrent_requests_over_more_sets_than_places_all_succeed(cluster):
    """Ray keeps evicting while requests for the evicted set are still arriving or running: each one
    is answered, with its set's answer (an eager unload on eviction made some of them 404)."""
    from concurrent.futures import ThreadPoolExecutor

    url, expected = cluster["url"], cluster["expected"]
    models = ["alpha", "beta", "delta"] * 6

    def ask(model: str) -> tuple[str, int, str]:
        r = complete(url, model)
        return model, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, models))
    failed = [a for a in answers if a[1] != 200]
    assert not failed, failed
    assert all(text == expected[model] for model, _, text in answers), answers


def test_stream_base_and_errors_through_the_router(cluster):
    from served_world import BASE_NAME

    url = cluster["url"]
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert complete(url, BASE_NAME).status_code == 200  # the base: any replica
    missing = complete(url, "nosuch")  # on neither the registry nor the remote
    assert missing.status_code == 404 and missing.json()["error"]["code"] is not None
    assert "remote" in missing.json()["error"]["message"], missing.text
    models = httpx.get(url + "/v1/models", timeout=60).json()
    assert BASE_NAME in {m["id"] for m in models["data"]}


def test_a_replica_killed_mid_stream_fails_its_request_and_is_replaced(cluster):
    """Last in the module: it replaces a replica."""
    from ray import serve

    from expertlib.server.replicas import REPLICA_HEADER, replica_stats

    url, expected = cluster["url"], cluster["expected"]
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    events: list[str] = []
    start = time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        victim = r.headers[REPLICA_HEADER]
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    break
        os.kill(replica_stats()[victim]["pid"], signal.SIGKILL)
        killed = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):  # a cut connection is a clean end too
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
    assert time.monotonic() - killed < 60, "the stream hung after its replica died"
    assert "data: [DONE]" not in events and len(events) < 200, events[-3:]
    assert '"error"' in events[-1], events[-1]
    # meanwhile the other replica answers (the router may first try the dead one: 503, retry)
    deadline = time.monotonic() + 120
    while True:
        r = complete(url, "beta")
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == expected["beta"]
            break
        assert r.status_code == 503 and time.monotonic() < deadline, r.text
        time.sleep(1)
    # Ray starts a replacement (an engine start: minutes on a busy machine)
    deadline = time.monotonic() + 600
    while True:
        app = serve.status().applications["expertlib"]
        states = app.deployments["ExpertReplica"].replica_states
        fresh = set(replica_stats()) - {victim}
        if states.get("RUNNING") == 2 and len(fresh) == 2:
            break
        assert time.monotonic() < deadline, (states, replica_stats().keys())
        time.sleep(2)
    for model in ("alpha", "gamma"):
        assert answered(url, model)[1] == expected[model], model
    print(f"killed after {killed - start:.1f} s; replaced in {time.monotonic() - killed:.0f} s")
