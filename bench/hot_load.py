"""Hot load: time to load an expert set into a running vLLM engine vs starting an engine on a
checkpoint with the set merged in (what serving a new task costs without slots).

    python bench/hot_load.py [--repeats 5]

Also loads sets of 1, 2, 4 and 8 experts per layer, to show the load time grows with the set size.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=512, max_num_seqs=8)


def cleanup() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from expertlib.apply import apply_expert_set
    from expertlib.engine import ExpertEngine
    from expertlib.vllm_plugin.testing import BENCH_BASE, make_bench_sets, make_vllm_tiny_base

    root = Path(tempfile.mkdtemp(prefix="bench-hotload-"))
    base_dir = root / "base"
    model = make_vllm_tiny_base("qwen2_moe", base_dir, **BENCH_BASE)
    sizes = (1, 2, 4, 8)
    files: dict[int, list[Path]] = {}
    for k in sizes:
        sets = make_bench_sets(model, args.repeats, experts_per_layer=k, seed=k)
        files[k] = [es.save(root / f"k{k}-{i}.safetensors") for i, es in enumerate(sets)]
    params = SamplingParams(max_tokens=1, temperature=0.0)

    engine = ExpertEngine(base_dir, slots=8, max_sets=4, **ENGINE_KW)
    engine.generate(["warm up"], None, params)
    load_s: dict[int, list[float]] = {k: [] for k in sizes}
    unload_s: list[float] = []
    for k in sizes:
        for path in files[k]:
            t = time.perf_counter()
            name = engine.load(path)
            load_s[k].append(time.perf_counter() - t)
            engine.generate(["x"], name, params)  # serves at once
            t = time.perf_counter()
            engine.unload(name)
            unload_s.append(time.perf_counter() - t)
    del engine
    cleanup()

    # the alternative: write a merged checkpoint, start an engine on it, serve the first token
    merged = root / "merged"
    t = time.perf_counter()
    from expertlib.patch import ExpertSet

    with apply_expert_set(model, ExpertSet.open(files[2][0])):
        model.save_pretrained(str(merged))
    for f in base_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, merged / f.name)
    merge_s = time.perf_counter() - t
    t = time.perf_counter()
    llm = LLM(str(merged), **ENGINE_KW)
    llm.generate(["x"], params, use_tqdm=False)
    start_s = time.perf_counter() - t
    del llm
    cleanup()

    size = {k: files[k][0].stat().st_size for k in sizes}
    print(
        f"model: qwen2_moe hidden {BENCH_BASE['hidden_size']}, {BENCH_BASE['num_hidden_layers']} MoE layers x "
        f"{BENCH_BASE['num_experts']} experts, float32; median of {args.repeats} loads (file -> slots, remap row)"
    )
    print("| experts/layer | set file (MiB) | hot load (ms) | ms per MiB |")
    print("|---|---|---|---|")
    for k in sizes:
        med = statistics.median(load_s[k]) * 1e3
        print(f"| {k} | {size[k] / 2**20:.2f} | {med:.1f} | {med / (size[k] / 2**20):.1f} |")
    hot = statistics.median(load_s[2])
    print(f"unload: {statistics.median(unload_s) * 1e3:.1f} ms (median)")
    print(
        f"merge checkpoint (apply + save_pretrained): {merge_s:.2f} s; start engine on it + first token: {start_s:.2f} s"
    )
    print(
        f"ratio hot load / engine start on merged checkpoint: {hot / start_s:.4f} ({start_s / hot:.0f}x faster)"
    )
    print(f"ratio hot load / (merge + engine start):           {hot / (merge_s + start_s):.4f}")


if __name__ == "__main__":
    main()
