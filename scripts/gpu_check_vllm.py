"""The vLLM-on-GPU check, for a machine with an NVIDIA GPU and this project installed with vLLM
(`make install ENGINE=gpu`): expert slots served as in production, checked against vLLM itself.

    python scripts/gpu_check_vllm.py [--out DIR] [--min-ratio 0.9]    # on the GPU
    python scripts/gpu_check_vllm.py --dry-run                       # CPU vLLM, tiny, eager (make test)

1. The GPU-path tests, by file, no `-m` filter (a marker expression would silently deselect files
   that lack the marker): tests/test_gpu_paths.py, test_vllm_routing.py, test_vllm_engine.py,
   test_vllm_compiled.py, test_vllm_archs.py, with TRITON_F32_DEFAULT=ieee (Triton's float32 `tl.dot`
   is TF32 otherwise, and those tests compare float32 tokens exactly). A deselected or skipped test
   fails the step.
2. Production settings: a bf16 slot engine with vLLM's defaults (torch.compile, CUDA graphs captured
   at start, before any set is loaded), 4 sets loaded into 3 set rows (the 4th lands in an evicted
   row), one batch mixing three sets and the base at a size that is not a capture size. Every request
   is compared with plain vLLM serving a checkpoint with its set merged in, under a logprob tolerance:
   greedy tokens agree until a near-tie, where the two choices are within BF16_TOL nats (bf16 sums a
   token's experts in another order when one sits in a slot; Triton's tile sizes follow the batch).
3. Throughput: the same mixed requests against plain vLLM on the base (same settings, same batch),
   the ratio asserted (>= --min-ratio on the GPU; printed only in the dry run).

Results: a table on the console and in DIR/gpu_check_vllm.md (DIR: --out, else $OUT, else a temp
dir); exit 0 all passed, 1 a step failed, 2 no GPU (without --dry-run).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = [
    "tests/test_gpu_paths.py",
    "tests/test_vllm_routing.py",
    "tests/test_vllm_engine.py",
    "tests/test_vllm_compiled.py",
    "tests/test_vllm_archs.py",
]
#: nats: where greedy tokens of the slot engine and the merged checkpoint first differ, both must be
#: this close in the other run's logprobs (bf16 near-ties; a wrong set moves logprobs by whole nats)
BF16_TOL = 0.2
PROMPTS = ["Hello world", "The cat", "abc def", "Once upon", "x = 1 +", "Dear sir", "1 2 3"]


def cleanup() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def run_tests(dry: bool) -> str:
    """The GPU-path test files as they are; fails on any deselected or skipped test."""
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TEST_FILES]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    print(res.stdout[-3000:], res.stderr[-2000:], sep="\n")
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"pytest exited {res.returncode}: {summary}"
    assert "deselected" not in summary and "skipped" not in summary, f"tests did not all run: {summary}"
    return summary


def make_world(tmp: Path, dry: bool):
    """A base (bf16 on the GPU) and 4 random expert sets; each set also merged into its own checkpoint."""
    import torch

    from expertlib.apply import apply_expert_set
    from expertlib.moe import moe_layer_indices
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    size = (
        {} if dry else dict(hidden_size=1024, num_hidden_layers=8, moe_intermediate_size=512, num_experts=64)
    )
    dtype = torch.float32 if dry else torch.bfloat16
    model = make_vllm_tiny_base("qwen3_moe", tmp / "base", dtype=dtype, **size)
    layers = moe_layer_indices(model)
    sets = [
        random_expert_set(model, f"set{i}", {layer: [i, i + 2] for layer in layers}, seed=i + 1)
        for i in range(4)
    ]
    merged = {}
    for es in sets[1:]:  # set0 is evicted by set3
        out = tmp / f"merged-{es.manifest.task}"
        with apply_expert_set(model, es):
            model.save_pretrained(str(out))
        for f in (tmp / "base").iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, out / f.name)
        merged[es.manifest.task] = out
    return tmp / "base", sets, merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU vLLM, tiny model, eager, float32")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--min-ratio", type=float, default=0.9, help="mixed / plain vLLM throughput to assert")
    ap.add_argument("--skip-tests", action="store_true", help="skip step 1 (the test files)")
    args = ap.parse_args()
    out_dir = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_vllm."))
    out_dir.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    if dry:  # in-process engines, a small CPU KV cache: the test suite's settings
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check_vllm: torch sees no CUDA GPU; --dry-run is the CPU mode", file=sys.stderr)
            return 2
    from vllm import LLM, SamplingParams

    from expertlib.engine import ExpertEngine
    from expertlib.testing import first_greedy_gap

    rows: list[tuple[str, str, str]] = []
    failed = False

    def row(step: str, value: str, status: str = "ok") -> None:
        nonlocal failed
        failed |= status != "ok"
        rows.append((step, value, status))
        print(f"== {step}: {value} [{status}]", flush=True)

    if args.skip_tests or dry:
        row(
            "GPU-path tests",
            "skipped (dry run: make test runs these files)" if dry else "skipped (--skip-tests)",
        )
    else:
        try:
            row("GPU-path tests, TRITON_F32_DEFAULT=ieee", run_tests(dry))
        except Exception as exc:  # noqa: BLE001 - reported, the engine steps still run
            row("GPU-path tests", str(exc), "FAIL")

    kw = dict(max_model_len=256, max_num_seqs=16, dtype="float32" if dry else "bfloat16")
    kw |= dict(enforce_eager=True) if dry else dict(gpu_memory_utilization=0.35)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, logprobs=8)
    names = ["set1", "set2", "set3", None] * 3 + ["set1"]  # 13 requests: not a CUDA-graph capture size
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    bench = SamplingParams(max_tokens=16 if dry else 64, temperature=0.0, ignore_eos=True)
    bench_names, bench_prompts = (names, prompts) if dry else (names * 4, prompts * 4)
    # the dry run compares the set in the evicted row and the base only (each reference is an engine start)
    compared = ("set3", None) if dry else ("set1", "set2", "set3", None)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="scratch.") as tmp:
        base, sets, merged = make_world(Path(tmp), dry)
        t = time.perf_counter()
        engine = ExpertEngine(base, slots=8, max_sets=3, **kw)
        row("slot engine start", f"{time.perf_counter() - t:.0f} s; {engine.memory}")
        info = engine.llm.collective_rpc(
            lambda w: (
                str(w.model_runner.compilation_config.cudagraph_mode),
                list(w.model_runner.cudagraph_batch_sizes or []),
            )
        )[0]
        if dry:
            row("CUDA graphs", f"none on CPU/eager ({info[0]})")
        else:
            ok = info[1] and "NONE" not in info[0]
            row(
                "CUDA graphs captured at start",
                f"mode {info[0]}, sizes {info[1][:6]}...",
                "ok" if ok else "FAIL",
            )
        for es in sets:
            engine.load(es)  # set0 is the least recently used when set3 arrives: evicted
        row("4 sets into 3 set rows", f"resident {sorted(engine.loaded_sets())}",
            "ok" if sorted(engine.loaded_sets()) == ["set1", "set2", "set3"] else "FAIL")  # fmt: skip
        mixed = engine.generate(prompts, names, greedy)
        engine.generate(bench_prompts[:8], bench_names[:8], bench)  # warm-up
        t = time.perf_counter()
        engine.generate(bench_prompts, bench_names, bench)
        mixed_s = time.perf_counter() - t
        del engine
        cleanup()

        worst, differs = 0.0, 0
        for name in compared:
            llm = LLM(str(merged[name] if name else base), **kw)
            idx = [i for i, n in enumerate(names) if n == name]
            ref = llm.generate([prompts[i] for i in idx], greedy, use_tqdm=False)
            if name is None:  # plain vLLM on the base: the throughput reference
                on_base = llm.generate(prompts, greedy, use_tqdm=False)
                base_tokens = [list(r.outputs[0].token_ids) for r in on_base]
                llm.generate(bench_prompts[:8], bench, use_tqdm=False)
                t = time.perf_counter()
                llm.generate(bench_prompts, bench, use_tqdm=False)
                plain_s = time.perf_counter() - t
            del llm
            cleanup()
            for i, r in zip(idx, ref, strict=True):
                at, gap = first_greedy_gap(mixed[i], r)
                if at is not None:
                    differs += 1
                    worst = max(worst, gap)
        ok = worst < BF16_TOL
        checked = sum(1 for n in names if n in compared)
        row("mixed batch vs merged-checkpoint vLLM", f"{checked} of {len(names)} requests "
            f"({', '.join(map(str, compared))}), {differs} part at a near-tie, "
            f"largest gap {worst:.3f} nats (tolerance {BF16_TOL})", "ok" if ok else "FAIL")  # fmt: skip
        moved = sum(list(mixed[i].outputs[0].token_ids) != base_tokens[i] for i, n in enumerate(names) if n)
        row("sets change the output", f"{moved} of {sum(1 for n in names if n)} set requests differ from the base",
            "ok" if moved else "FAIL")  # fmt: skip
        ratio = plain_s / mixed_s
        status = "ok" if dry or ratio >= args.min_ratio else "FAIL"
        note = "not asserted in the dry run" if dry else f"asserted >= {args.min_ratio}"
        row(
            "mixed / plain vLLM throughput",
            f"{ratio:.3f} ({len(bench_names)} requests x {bench.max_tokens} tokens; {note})",
            status,
        )

    table = "\n".join(
        ["| step | result | status |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    )
    head = f"# vLLM check ({'dry run, CPU' if dry else 'CUDA'})\n\n"
    (out_dir / "gpu_check_vllm.md").write_text(head + table + "\n")
    print("\n" + head + table)
    print(f"\ngpu_check_vllm: {'FAILED' if failed else 'all steps passed'}; results in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
