"""`expertlib serve --replicas 2` on a local Ray (2 CPUs): two CPU vLLM engines of a tiny base under
Ray Serve, the set router in front. Requests of one set land on one replica (the replica id comes
back in a header), both replicas serve, answers are the transformers reference's greedy tokens,
a streamed answer streams, and errors keep their OpenAI shape through the router.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
from server_process import TEST_ENV, free_port

pytest.importorskip("vllm")
pytest.importorskip("ray.serve")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve
    from served_world import BASE_NAME, CTX, Reference, build

    from expertlib.server import ServerSettings
    from expertlib.server.replicas import serve_replicated

    root = tmp_path_factory.mktemp("replicas")
    base_dir, sets = build(root)
    saved = dict(os.environ)
    os.environ.update(TEST_ENV)  # the replicas' engines: in-process core, offline
    port = free_port()
    settings = ServerSettings(
        base=str(base_dir),
        served_name=BASE_NAME,
        registry=str(root / "registry"),
        slots=8,
        max_sets=2,
        kv_cache_memory=64 << 20,
        max_model_len=CTX,
        port=port,
        engine_args={"enforce_eager": True, "dtype": "float32", "max_num_seqs": 4},
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_replicated(settings, 2, block=False)
        yield {"url": f"http://127.0.0.1:{port}", "ref": Reference(base_dir, sets)}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def complete(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def test_a_set_sticks_to_one_replica_and_both_serve(cluster):
    from expertlib.server.replicas import REPLICA_HEADER

    url, ref = cluster["url"], cluster["ref"]
    placed: dict[str, set[str]] = {"alpha": set(), "beta": set()}
    answers: dict[str, set[str]] = {"alpha": set(), "beta": set()}
    for model in ("alpha", "beta"):
        r = complete(url, model)
        assert r.status_code == 200, r.text
        placed[model].add(r.headers[REPLICA_HEADER])
        answers[model].add(r.json()["choices"][0]["text"])
        time.sleep(3)  # Ray's routers learn which replica holds the set (pushed by the replica)
    for _ in range(4):
        for model in ("alpha", "beta"):
            r = complete(url, model)
            assert r.status_code == 200, r.text
            placed[model].add(r.headers[REPLICA_HEADER])
            answers[model].add(r.json()["choices"][0]["text"])
    assert len(placed["alpha"]) == 1 and len(placed["beta"]) == 1, placed  # every request to its holder
    assert placed["alpha"] != placed["beta"], placed  # the second set went to the empty replica
    ids = ref.tok.encode(PROMPT)
    for model in ("alpha", "beta"):
        assert answers[model] == {ref.tok.decode(ref.greedy(ids, model, 4))}, (model, answers)


def test_stream_base_and_errors_through_the_router(cluster):
    url = cluster["url"]
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    from served_world import BASE_NAME

    assert complete(url, BASE_NAME).status_code == 200  # the base: any replica
    missing = complete(url, "nosuch")
    assert missing.status_code == 404 and missing.json()["error"]["code"] is not None
    models = httpx.get(url + "/v1/models", timeout=60).json()
    assert BASE_NAME in {m["id"] for m in models["data"]}
