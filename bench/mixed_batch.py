"""Mixed-task throughput on vLLM: 8 expert sets loaded, requests spread evenly over them, vs the base
model alone with the same engine settings in the same run (and vs plain vLLM without the plugin).

    python bench/mixed_batch.py [--requests 48] [--tokens 48] [--rounds 5]

Prints output tokens/s for each and the ratios; the target is mixed / base >= 0.95.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=32)
PROMPTS = ["Q: what is 12+7?\nA:", "Write a haiku about rain.", "def fib(n):", "Translate 'cat' to French:"]


def throughput(generate, prompts, expert_sets, params) -> tuple[float, float]:
    """(output tokens per wall second, per CPU second of this process). The engine runs in-process,
    so CPU time covers all its work and is less disturbed than wall time by other load on the machine."""
    t, c = time.perf_counter(), time.process_time()
    outs = generate(prompts, expert_sets, params)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / dt, n / dc


def slot_overhead_us(num_layers: int, num_experts: int, top_k: int, tokens: int, sets: int) -> float:
    """Microseconds per decode step the slot machinery adds: filling per-token set rows once, and one
    remap gather per MoE layer (timed in isolation, so machine load barely affects it)."""
    import torch

    from expertlib.vllm_plugin.routing import SlotContext

    ctx = SlotContext(
        num_layers=num_layers,
        num_experts=num_experts,
        slots=2 * sets,
        max_sets=sets,
        max_tokens=4096,
        device="cpu",
    )
    ids = torch.randint(0, num_experts, (tokens, top_k), dtype=torch.int32)
    rows = [i % (sets + 1) for i in range(tokens)]
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        ctx.set_tokens(rows, [1] * tokens)
        for layer in range(num_layers):
            ctx.remap_ids(layer, ids)
    return (time.perf_counter() - t) / n * 1e6


def cleanup() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def run_plain(base_dir: Path, prompts: list[str], params, rounds: int) -> list[float]:
    """Plain vLLM (its own model class, no slots) on the same base and settings."""
    from vllm import LLM

    llm = LLM(str(base_dir), **ENGINE_KW)

    def generate(p, _sets, sp):
        return llm.generate(p, sp, use_tqdm=False)

    generate(prompts[:8], None, params)  # warm-up
    return [throughput(generate, prompts, None, params) for _ in range(rounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sets", type=int, default=8)
    args = ap.parse_args()

    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine
    from expertlib.vllm_plugin.testing import BENCH_BASE, make_bench_sets, make_vllm_tiny_base

    root = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    base_dir = root / "base"
    model = make_vllm_tiny_base("qwen2_moe", base_dir, **BENCH_BASE)
    sets = make_bench_sets(model, args.sets)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    mixed_sets = [f"task{i % args.sets}" for i in range(args.requests)]

    engine = ExpertEngine(base_dir, slots=2 * args.sets, max_sets=args.sets, **ENGINE_KW)
    for es in sets:
        engine.load(es)
    engine.generate(prompts[:8], mixed_sets[:8], params)  # warm-up
    base_tps, mixed_tps = [], []
    for r in range(args.rounds):  # interleaved, alternating order, so drift in machine load hits both
        pair = [("base", None), ("mixed", mixed_sets)]
        for kind, which in pair if r % 2 == 0 else pair[::-1]:
            (base_tps if kind == "base" else mixed_tps).append(
                throughput(engine.generate, prompts, which, params)
            )
    del engine
    cleanup()
    plain_tps = run_plain(base_dir, prompts, params, args.rounds)
    cleanup()

    def med(xs, i):
        return statistics.median(x[i] for x in xs)

    ratio_wall = statistics.median(m[0] / b[0] for m, b in zip(mixed_tps, base_tps, strict=True))
    ratio_cpu = statistics.median(m[1] / b[1] for m, b in zip(mixed_tps, base_tps, strict=True))
    print(
        f"model: qwen2_moe hidden {BENCH_BASE['hidden_size']}, {BENCH_BASE['num_hidden_layers']} MoE layers x "
        f"{BENCH_BASE['num_experts']} experts (top-{BENCH_BASE['num_experts_per_tok']}); {args.sets} sets x 2 experts/layer; "
        f"{args.requests} requests x {args.tokens} tokens, max_num_seqs {ENGINE_KW['max_num_seqs']}, float32, eager; "
        f"median of {args.rounds} rounds"
    )
    print("| run | output tok/s (wall, median) | output tok/s per CPU-s (median) | wall rounds |")
    print("|---|---|---|---|")
    for label, xs in (
        ("plain vLLM, base", plain_tps),
        ("expertlib engine, base only", base_tps),
        (f"expertlib engine, {args.sets} sets mixed", mixed_tps),
    ):
        print(f"| {label} | {med(xs, 0):.1f} | {med(xs, 1):.1f} | {', '.join(f'{x[0]:.1f}' for x in xs)} |")
    print(
        f"ratio mixed / base, same engine (median of per-round ratios): wall {ratio_wall:.3f}, CPU {ratio_cpu:.3f}   (target >= 0.95)"
    )
    print(
        f"ratio mixed / plain vLLM (medians): wall {med(mixed_tps, 0) / med(plain_tps, 0):.3f}, CPU {med(mixed_tps, 1) / med(plain_tps, 1):.3f}"
    )
    us = slot_overhead_us(
        BENCH_BASE["num_hidden_layers"],
        BENCH_BASE["num_experts"],
        BENCH_BASE["num_experts_per_tok"],
        32,
        args.sets,
    )
    step_us = 1e6 * 32 / med(plain_tps, 0)  # a decode step of 32 sequences, at plain vLLM's median speed
    print(
        f"slot machinery per decode step of 32 tokens: {us:.0f} us = {us / step_us:.2%} of a plain step ({step_us / 1e3:.1f} ms)"
    )
    print(
        f"ratio base-only / plain vLLM (medians): wall {med(base_tps, 0) / med(plain_tps, 0):.3f}, CPU {med(base_tps, 1) / med(plain_tps, 1):.3f}"
    )


if __name__ == "__main__":
    main()
