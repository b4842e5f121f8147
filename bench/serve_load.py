"""Load benchmark of `expertlib serve`: concurrent clients spread over several expert sets for a
fixed time, side by side with the same load all on the base model.

Against a running server:

    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY \\
        --base-model tiny --models alpha,beta,gamma,delta --clients 8 --duration 30

Self-contained (builds a tiny base with random expert sets, starts `expertlib serve` on it, runs,
stops it):

    python bench/serve_load.py --tiny /tmp/serve-bench --clients 8 --duration 30

Modes: all requests spread round-robin over the sets ("mixed"), all on the first set ("one set"),
all on the base ("base only"). Every request generates exactly --max-tokens tokens (ignore_eos), so
tokens/s compare like for like. Prints, per mode: requests, requests/s, generated tokens/s, p50/p99
latency and errors. Modes run in alternating rounds (mixed, one set, base, mixed, ...) so drift of a
shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = [
    "Hello world",
    "2+2=",
    "The cat sat on",
    "def f(x):",
    "Q: why?",
    "abcdef",
    "Once upon a time",
    "x = 1",
]
TINY_SETS = {
    "alpha": {0: [1, 3], 1: [0, 5]},
    "beta": {0: [2], 1: [1, 6, 7]},
    "gamma": {0: [0, 4, 6]},
    "delta": {1: [2, 4]},
}


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)
    short: int = 0  # answers with fewer tokens than asked for (must be 0 with ignore_eos)
    finish: dict[str, int] = field(default_factory=dict)
    short_samples: list = field(default_factory=list)

    def row(self, mode: str) -> dict:
        lat = sorted(self.latencies)
        n = len(lat)
        pct = (lambda q: lat[min(n - 1, int(q * n))] * 1000) if n else (lambda q: float("nan"))
        return {
            "mode": mode,
            "requests": n,
            "req_per_s": n / self.seconds if self.seconds else 0.0,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if n else float("nan"),
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "short_answers": self.short,
            "finish_reasons": self.finish,
            "short_samples": self.short_samples[:8],
        }


async def run_load(
    client, models: list[str], *, clients: int, duration: float, max_tokens: int, stats: Stats
):
    """`clients` concurrent loops, each sending one request at a time, models round-robin, for `duration` s."""
    deadline = time.perf_counter() + duration

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < deadline:
            model = models[i % len(models)]
            prompt = PROMPTS[(i // len(models)) % len(PROMPTS)]
            i += clients
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    extra_body={"ignore_eos": True},  # every answer has exactly max_tokens tokens
                )
            except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                stats.errors += 1
                kind = type(exc).__name__
                stats.error_kinds[kind] = stats.error_kinds.get(kind, 0) + 1
                continue
            stats.latencies.append(time.perf_counter() - t0)
            stats.tokens += r.usage.completion_tokens
            if r.usage.completion_tokens < max_tokens:
                stats.short += 1
                stats.short_samples.append(
                    [model, prompt, r.usage.completion_tokens, r.choices[0].finish_reason, r.choices[0].text]
                    + [(r.choices[0].model_extra or {}).get("stop_reason")]
                )
            reason = str(r.choices[0].finish_reason)
            stats.finish[reason] = stats.finish.get(reason, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(clients)))
    stats.seconds += time.perf_counter() - t0


async def bench(args) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=args.url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=300
    )
    models = [m for m in args.models.split(",") if m]
    modes = {
        f"mixed ({len(models)} sets)": models,
        f"one set ({models[0]})": models[:1],
        "base only": [args.base_model],
    }
    # warm-up: every model once
    for m in [*models, args.base_model]:
        await client.completions.create(model=m, prompt="warm up", max_tokens=4, temperature=0)
    stats = {mode: Stats() for mode in modes}
    for _ in range(args.rounds):
        for mode, ms in modes.items():
            await run_load(
                client,
                ms,
                clients=args.clients,
                duration=args.duration / args.rounds,
                max_tokens=args.max_tokens,
                stats=stats[mode],
            )
    await client.close()
    return [stats[m].row(m) for m in modes]


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nclients={args.clients} duration={args.duration}s per mode ({args.rounds} rounds) max_tokens={args.max_tokens}"
    )
    head = f"{'mode':<20} {'requests':>8} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'short':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['mode']:<20} {r['requests']:>8} {r['req_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
            f"{r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6} {r['short_answers']:>6}"
        )
    base = rows[-1]["tokens_per_s"]
    for r in rows[:-1]:
        if base:
            print(f"{r['mode']} / base only, tokens/s: {r['tokens_per_s'] / base:.3f}")


# --- self-contained mode --------------------------------------------------------------------------------


def launch_tiny(folder: Path, *, max_num_seqs: int) -> tuple[subprocess.Popen, str, list[str]]:
    """Build a tiny qwen2_moe base and four random sets in `folder`, start `expertlib serve` on them."""

    from expertlib.errors import EngineError
    from expertlib.moe import load_model
    from expertlib.server import free_port, wait_ready
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base"
    if not (base / "config.json").is_file():
        make_vllm_tiny_base("qwen2_moe", base)
    model = load_model(base)
    paths = []
    for i, (name, experts) in enumerate(TINY_SETS.items()):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            random_expert_set(model, name, experts, seed=i + 1).save(path)
        paths.append(path)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = [
        sys.executable,
        "-m",
        "expertlib.cli.main",
        "serve",
        str(base),
        "--served-name",
        "tiny",
        "--port",
        str(port),
    ]
    for p in paths:
        argv += ["--expert-set", str(p)]
    argv += ["--slots", "8", "--max-sets", "4", "--max-queue", "1024"]
    argv += ["--engine-arg", "enforce_eager=true", "--engine-arg", "dtype=float32"]
    argv += ["--engine-arg", "max_model_len=256", "--engine-arg", f"max_num_seqs={max_num_seqs}"]
    log = open(folder / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s=600, proc=proc, log_path=folder / "server.log", interval_s=1.0)
    except EngineError as exc:  # exited, or not ready in time
        proc.kill()
        raise SystemExit(str(exc)) from None
    return proc, url, list(TINY_SETS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=os.environ.get("EXPERTLIB_API_KEY"))
    ap.add_argument("--base-model", default="tiny", help="the base's `model` name on the server")
    ap.add_argument("--models", default="", help="comma-separated expert sets for the mixed load")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per mode")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds the duration is split into")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tiny", type=Path, help="build a tiny base + 4 sets here and start the server on it")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    proc = None
    if args.tiny:
        proc, args.url, models = launch_tiny(args.tiny, max_num_seqs=max(args.clients, 8))
        args.models, args.base_model, args.api_key = ",".join(models), "tiny", None
    if not args.models:
        ap.error("--models is required (or use --tiny)")
    try:
        rows = asyncio.run(bench(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print_table(rows, args)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
