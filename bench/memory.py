"""Memory of one vLLM engine serving 0, 8 and 32 expert sets vs one engine per task.

    python bench/memory.py [--counts 0 8 32]

Each configuration runs in a fresh process (so resident memory is not polluted by the previous one):
plain vLLM on the base, and the expertlib engine sized for N sets (2 slots per layer per set) with N
sets loaded. Reported: weight memory on the worker (parameters, exact) and process resident memory
(RSS, includes the runtime and touched KV cache). One engine per task costs N x a plain engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from probes import rss, weight_bytes

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=8)
MiB = 2**20


def child(root: Path, n: int | None) -> dict:
    """n=None: plain vLLM; else the expertlib engine sized for n sets with n sets loaded."""
    from vllm import LLM

    from expertlib.patch import ExpertSet

    before = rss()
    if n is None:
        llm = LLM(str(root / "base"), **ENGINE_KW)
        return {"weights": llm.collective_rpc(weight_bytes)[0], "rss": rss(), "rss_engine": rss() - before}
    from expertlib.engine import ExpertEngine

    engine = ExpertEngine(root / "base", slots=max(1, 2 * n), max_sets=max(1, n), **ENGINE_KW)
    started = rss()
    patch_bytes = 0
    for i in range(n):
        es = ExpertSet.open(root / f"task{i}.safetensors")
        patch_bytes += es.nbytes
        engine.load(es)
    assert len(engine.loaded_sets()) == n
    return {
        "weights": engine.llm.collective_rpc(weight_bytes)[0],
        "rss": rss(),
        "rss_engine": started - before,
        "rss_loads": rss() - started,
        "patch_bytes": patch_bytes,
    }


def run_child(root: Path, n: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(root), "--n", "plain" if n is None else str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 8, 32])
    ap.add_argument("--child", type=Path)
    ap.add_argument("--n")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, None if args.n == "plain" else int(args.n))))
        return

    from expertlib.moe import describe
    from expertlib.vllm_plugin.testing import BENCH_BASE, make_bench_sets, make_vllm_tiny_base

    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = make_vllm_tiny_base("qwen2_moe", root / "base", **BENCH_BASE)
    for es in make_bench_sets(model, max(args.counts)):
        es.save(root / f"{es.manifest.task}.safetensors")
    spec = describe(model)

    plain = run_child(root, None)
    print(
        f"model: qwen2_moe {spec.total_params / 1e6:.1f}M params, {len(spec.moe_layers)} MoE layers x "
        f"{spec.num_experts} experts; each set replaces 2 experts per layer; float32"
    )
    print(
        "| sets | engines | weights (MiB) | RSS (MiB) | patch files (MiB) | weights, one engine per task (MiB) | RSS, one engine per task (MiB) | weights x | RSS x |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| plain | 1 | {plain['weights'] / MiB:.1f} | {plain['rss'] / MiB:.0f} | - | - | - | - | - |")
    for n in args.counts:
        r = run_child(root, n)
        per_task_w = max(n, 1) * plain["weights"]
        per_task_rss = max(n, 1) * plain["rss"]
        print(
            f"| {n} | 1 | {r['weights'] / MiB:.1f} | {r['rss'] / MiB:.0f} | {r['patch_bytes'] / MiB:.1f} | "
            f"{per_task_w / MiB:.1f} | {per_task_rss / MiB:.0f} | {r['weights'] / per_task_w:.3f} | {r['rss'] / per_task_rss:.3f} |"
        )
        growth = r["weights"] - plain["weights"]
        print(
            f"  {n} sets: weights grow by {growth / MiB:.1f} MiB over plain vLLM; the patches hold "
            f"{r['patch_bytes'] / MiB:.1f} MiB (slots sized 2 per layer per set: 'growth / patches' = "
            f"{growth / r['patch_bytes'] if r['patch_bytes'] else float('nan'):.2f}); RSS grew {r['rss_loads'] / MiB:.1f} MiB while loading"
        )


if __name__ == "__main__":
    main()
