"""`serve --replicas 2` vs one replica on the same machine: throughput, where requests land, answers.

    python bench/replicas.py [--max-sets 2] [--rounds 4] [--requests 32] [--tokens 16] [--clients 4]
                             [--no-write]

A tiny qwen2_moe base (the tests' world) and four expert sets; one local Ray cluster, one Ray Serve
HTTP proxy serving two applications side by side: `/one` (1 replica) and `/two` (2 replicas), each
replica a CPU vLLM engine with `--max-sets` sets and one set pinned (`gamma`: on every replica).
With `--max-sets 2` a replica's multiplexer holds one unpinned set: `/one` must swap alpha and beta
while `/two` keeps one on each replica (the case routing is for); with `--max-sets 4` one replica
holds every set, and the ratio is that of the engines alone. Both are warmed up, then:

- answers: every set's greedy answer (temperature 0) through `/two` must equal `/one`'s and the
  single-engine server's (`expertlib serve` answers like one replica: the replica runs its app);
- rounds: `--requests` requests from `--clients` threads over the sets alpha, beta, gamma in turn,
  each round on `/one` then `/two` or the reverse (the order alternates), so other load on the machine
  hits both; the ratio is the median of per-round ratios of completion tokens per second;
- hit rate: the share of each application's requests during the rounds that landed on a replica
  already holding their set, from the replicas' own counters (`expertlib.server.replicas.replica_stats`).

Rows go to bench/replicas.json under `max_sets=N` (other configurations' rows are kept).

The point on a 2-core machine is routing, not speed: two engines share the same two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SECTION = "## Replicas: `serve --replicas 2` vs one replica (issue 23; CPU, tiny base)"
ROWS = Path(__file__).resolve().parent / "replicas.json"
SETS = {
    "alpha": {0: [1, 3], 1: [0, 5]},
    "beta": {0: [2], 1: [1, 6, 7]},
    "gamma": {0: [0, 4], 1: [2, 3]},
    "delta": {0: [5, 6], 1: [4]},
}
PINNED = "gamma"
ROUTED = ("alpha", "beta", "gamma")
PROMPT = "The cat sat on"


def build(root: Path) -> Path:
    from expertlib.moe import load_model
    from expertlib.registry import Registry
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    base = root / "base"
    make_vllm_tiny_base("qwen2_moe", base)
    model = load_model(base)
    reg = Registry(root / "registry")
    for i, (name, experts) in enumerate(SETS.items()):
        es = random_expert_set(model, name, experts, seed=i + 1, scale=2.0)
        reg.publish(es.save(root / f"{name}.safetensors"), base=base)
    return base


def complete(url: str, model: str, tokens: int, client: httpx.Client | None = None) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    r = (client or httpx).post(url + "/v1/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"{model} on {url}: {r.status_code} {r.text}")
    return r.json()


def round_of(url: str, requests: int, tokens: int, clients: int) -> float:
    """Completion tokens per second of `requests` requests from `clients` threads."""
    jobs = [ROUTED[i % len(ROUTED)] for i in range(requests)]
    lock = threading.Lock()
    done: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not jobs:
                        return
                    model = jobs.pop()
                try:
                    done.append(complete(url, model, tokens, client)["usage"]["completion_tokens"])
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-sets", type=int, default=2, help="sets per replica (one of them pinned)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/replicas.json")
    args = ap.parse_args()

    os.environ.update(
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    )
    import ray
    from ray import serve

    from expertlib.server import ServerSettings
    from expertlib.server.replicas import board, build_app, hit_rate, replica_stats

    root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    base = build(root)
    port = 18000 + os.getpid() % 1000
    settings = ServerSettings(
        base=str(base),
        served_name="tiny-moe",
        registry=str(root / "registry"),
        slots=8,
        max_sets=args.max_sets,
        pins=[PINNED],
        kv_cache_memory=64 << 20,
        max_model_len=256,
        port=port,
        engine_args={"enforce_eager": True, "dtype": "float32", "max_num_seqs": 8},
    )
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        board(create=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(settings, 1), name="one", route_prefix="/one")
        serve.run(build_app(settings, 2), name="two", route_prefix="/two")
        started = time.perf_counter() - t0
        urls = {n: f"http://127.0.0.1:{port}/{n}" for n in ("one", "two")}
        answers = {n: {m: complete(u, m, 16)["choices"][0]["text"] for m in SETS} for n, u in urls.items()}
        time.sleep(3)  # Ray's routers learn which replica holds which set
        for url in urls.values():
            round_of(url, len(ROUTED) * 2, 4, 1)  # warm-up
        same = answers["one"] == answers["two"]
        print(f"3 engines started in {started:.0f} s; answers /two == /one for every set: {same}", flush=True)

        before = replica_stats()
        rows = []
        for k in range(args.rounds):
            order = ("one", "two") if k % 2 == 0 else ("two", "one")
            rate = {n: round_of(urls[n], args.requests, args.tokens, args.clients) for n in order}
            rows.append(
                {"round": k, "order": list(order), **{f"{n}_tok_s": round(v, 1) for n, v in rate.items()}}
            )
            print(
                f"round {k}: 1 replica {rate['one']:.1f} tok/s, 2 replicas {rate['two']:.1f} tok/s",
                flush=True,
            )
        after = replica_stats()
        hits = {}
        for app in urls:
            mine = {r: c for r, c in after.items() if c.get("app") == app}
            hits[app] = hit_rate(before, mine)
        ratios = [r["two_tok_s"] / r["one_tok_s"] for r in rows]
        result = {
            "rounds": rows,
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            "hit_rate": {a: round(h / t, 4) if t else None for a, (h, t) in hits.items()},
            "hits_requests": hits,
            "answers_equal": same,
            "per_replica": {
                r: {k: c[k] for k in ("app", "requests", "sets", "loads", "evictions")}
                for r, c in after.items()
            },
            "settings": vars(args),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        }
        print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
        if not args.no_write:
            rows_by_config = json.loads(ROWS.read_text()) if ROWS.exists() else {}
            rows_by_config[f"max_sets={args.max_sets}"] = result
            ROWS.write_text(json.dumps(rows_by_config, indent=1) + "\n")
        if not same:
            sys.exit("answers differ between one and two replicas")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
