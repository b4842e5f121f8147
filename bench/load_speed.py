"""How fast a set moves: verify, load, reload, publish, push and pull (folder and HTTP) one real-shape
MoE layer set, decode of other sets while sets load, and a load/unload/evict soak, each ratio
measured side by side with the raw operation on the same bytes in one run.

    python bench/load_speed.py [--experts 16] [--repeats 5] [--engine] [--soak 1000] [--no-write]

The set is one Qwen3-30B-A3B MoE layer: 16 of 128 experts, gate/up (768, 2048) and down (2048, 768)
in bf16, 144 MiB. Ratios are throughputs (higher is better) against, on the same bytes: one
single-core sha256 pass, a memory copy (numpy), a file copy (shutil.copyfile).

Method, for a shared machine whose speed drifts: every step is timed right next to its baseline,
interleaved (baseline, step, baseline, step, ...) `--repeats` times, and the ratio reported is the
median of the per-pair ratios (time in the table: the step's median).

`--engine` adds what needs a vLLM engine, on a one-MoE-layer model with the real Qwen3-30B-A3B layer
shapes (bench/serve_scale.py's base, vocabulary cut to 8192): a set from the registry into the slots
(the full-depth extrapolation: 48 x that), a reload from the workers' host cache, and the decode
tokens/s of requests for a resident set while other sets load (evicting each other) against the same
requests without loads, interleaved. `--soak N` then runs N load/unload/evict cycles of real-shape sets
while requests for a pinned set run: every answer equal to its set's reference, the process's resident
memory and the slots in use printed along the way (flat is the target).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

H, INTER, MOE_LAYERS = 2048, 768, 48  # Qwen3-30B-A3B
SECTION = "## Moving sets at real size (issue 21: verify once, one-pass copies, loads without stalls)"


def paired(step, baseline, repeats: int, setup=None) -> tuple[float, float, float]:
    """(median step seconds, median baseline seconds, median of baseline/step per adjacent pair)."""
    steps, bases, ratios = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        baseline()
        b = time.perf_counter() - t
        if setup is not None:
            setup()
        t = time.perf_counter()
        step()
        s = time.perf_counter() - t
        steps.append(s)
        bases.append(b)
        ratios.append(b / s)
    return statistics.median(steps), statistics.median(bases), statistics.median(ratios)


def make_set(experts: int, seed: int = 0):
    from expertlib.identity import BaseIdentity
    from expertlib.moe import ExpertWeights
    from expertlib.patch import ExpertSet

    g = torch.Generator().manual_seed(seed)
    weights = {
        (0, e): ExpertWeights(
            gate=(torch.randn(INTER, H, generator=g) * 0.02).bfloat16(),
            up=(torch.randn(INTER, H, generator=g) * 0.02).bfloat16(),
            down=(torch.randn(H, INTER, generator=g) * 0.02).bfloat16(),
        )
        for e in range(experts)
    }
    base = BaseIdentity(
        model_type="qwen3_moe", config_digest="sha256:" + "0" * 64, name="Qwen3-30B-A3B (shapes)"
    )
    return ExpertSet.build(
        task=f"bench{seed}",
        base=base,
        experts=weights,
        base_digests={k: "sha256:" + "1" * 64 for k in weights},
    )


def cached_rows(es):
    """The set as the workers' host cache keeps it: every expert in the kernel's final layout, one
    (n, 2I, H) and one (n, H, I) tensor (`expertlib.vllm_plugin.worker.LayerRows`; the CPU prepack
    moves bytes within a row, so checkpoint layout stands in for it here)."""
    from expertlib.vllm_plugin.worker import LayerRows

    experts = [(e, w) for (_, e), w in es.experts()]
    return LayerRows(
        [e for e, _ in experts],
        torch.stack([torch.cat([w.gate, w.up]) for _, w in experts]),
        torch.stack([w.down for _, w in experts]),
    )


class Rows:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.rows: list[tuple[str, float, float, str, float, float]] = []

    def add(self, what: str, s: float, vs: str, ratio: float, target: float) -> None:
        self.rows.append((what, s, self.nbytes / s / 1e6, vs, ratio, target))
        print(f"  {what}: {s:.3f} s, {ratio:.2f}x {vs} (target >= {target}x)", flush=True)

    def table(self) -> list[str]:
        out = [
            f"| step ({self.nbytes / 2**20:.0f} MiB, one Qwen3-30B-A3B MoE layer) | s | MB/s | vs | ratio | target | |",
            "|---|---|---|---|---|---|---|",
        ]
        for what, s, mbs, vs, ratio, target in self.rows:
            ok = "met" if ratio >= target else "MISSED"
            out.append(f"| {what} | {s:.3f} | {mbs:.0f} | {vs} | {ratio:.2f}x | >= {target}x | {ok} |")
        return out


# --- library paths: no engine ----------------------------------------------------------------------------


def library_rows(args, root: Path, rows: Rows) -> dict:
    import numpy as np

    import expertlib.verify as verify
    from expertlib.patch import ExpertSet
    from expertlib.registry import Registry

    t = time.perf_counter()
    sets = [make_set(args.experts, seed) for seed in range(args.repeats + 1)]
    files = [es.save(root / f"set{i}.safetensors") for i, es in enumerate(sets)]
    print(
        f"built {len(files)} sets of {rows.nbytes / 2**20:.0f} MiB in {time.perf_counter() - t:.1f}s",
        flush=True,
    )
    data = files[0].read_bytes()
    arr = np.frombuffer(data, dtype=np.uint8)
    sha = lambda: hashlib.sha256(data).digest()  # noqa: E731
    mem = lambda: arr.copy()  # noqa: E731
    n = args.repeats
    copies = iter(range(10**6))

    def fcopy(sync: bool = False) -> None:
        """A file copy into a new file (as into a registry), the previous copy removed first."""
        shutil.rmtree(root / "copies", ignore_errors=True)
        (root / "copies").mkdir()
        dst = root / "copies" / f"{next(copies)}.bin"
        shutil.copyfile(files[0], dst)
        if sync:
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())

    # a never-seen set: read into host memory once + the full check (the worker's path)
    fresh = iter(files[1:])
    s, _, r = paired(lambda: ExpertSet.open(next(fresh)).read_verified(), sha, n, verify._CHECKED.clear)
    rows.add("first load of a never-seen set (read + full check)", s, "sha256 1 core", r, 0.8)

    # publish: one pass (copy + blob hash + the patch's own check)
    reg = Registry(root / "reg")
    pubs = iter(files)
    s, _, r = paired(lambda: reg.publish(next(pubs)), fcopy, min(n, len(files)))
    rows.add("publish (one pass: copy + blob hash + full check)", s, "file copy", r, 0.5)
    synced, plain, _ = paired(lambda: fcopy(True), fcopy, n)
    extra = f"- the registry fsyncs each blob before it enters: a file copy + fsync takes {synced:.3f} s, {plain:.3f} s without"

    # a registry blob verified at ingest, page cache warm: the record stands, bytes read once
    task = sets[0].manifest.task
    s, _, r = paired(lambda: reg.open(task).read_verified(), mem, n, verify._CHECKED.clear)
    rows.add("load of a registry blob verified at ingest (warm)", s, "memory copy", r, 0.5)
    ingest_s = s

    # reload from the host cache: the worker's copy of cached packed rows into slot rows
    from types import SimpleNamespace

    from expertlib.vllm_plugin.worker import copy_rows

    cached = cached_rows(ExpertSet.open(files[0]).read_verified())
    slots = SimpleNamespace(
        routed_experts=SimpleNamespace(
            w13_weight=torch.empty_like(cached.w13), w2_weight=torch.empty_like(cached.w2)
        )
    )
    ids = list(range(len(cached.experts)))
    s, _, r = paired(lambda: copy_rows(slots, ids, cached, cached.experts), mem, n)
    rows.add("reload from the host cache into slot rows", s, "memory copy", r, 0.8)
    slot_s = s

    # folder push and pull
    remote = root / "remote"
    s, _, r = paired(
        lambda: reg.push(task, str(remote)), fcopy, n, lambda: shutil.rmtree(remote, ignore_errors=True)
    )
    rows.add("push to a folder remote", s, "file copy", r, 0.5)
    s, _, r = paired(
        lambda: Registry(root / "pulled").pull(str(remote)),
        fcopy,
        n,
        lambda: shutil.rmtree(root / "pulled", ignore_errors=True),
    )
    rows.add("pull from a folder remote", s, "file copy", r, 0.5)

    # HTTP pull over loopback (a registry server in another process, on 127.0.0.1)
    with _serve(reg.root) as url:
        s, _, r = paired(
            lambda: Registry(root / "http").pull(url + "/v1/registry", [task]),
            fcopy,
            n,
            lambda: shutil.rmtree(root / "http", ignore_errors=True),
        )
    rows.add("pull over HTTP (loopback)", s, "file copy", r, 0.3)
    return dict(ingest_s=ingest_s, slot_s=slot_s, extra=extra)


def _serve_registry(root: Path, port: int) -> None:
    """A registry server (its own process, as a remote registry is)."""
    import uvicorn

    from expertlib.registry import Registry
    from expertlib.server.registry_app import registry_app

    uvicorn.run(
        registry_app(Registry(root)), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )


def _serve(root: Path):
    """Serve the registry at `root` over HTTP on 127.0.0.1 from another process; yields its URL."""
    import contextlib
    import multiprocessing as mp

    import httpx

    from expertlib.server import free_port

    @contextlib.contextmanager
    def run():
        port = free_port()
        proc = mp.get_context("spawn").Process(target=_serve_registry, args=(root, port), daemon=True)
        proc.start()
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    httpx.get(url + "/v1/registry/entries", timeout=2)
                    break
                except httpx.HTTPError:
                    if time.time() > deadline or not proc.is_alive():
                        raise
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.join(10)

    return run()


# --- with a vLLM engine -------------------------------------------------------------------------------------


def tree_rss() -> float:
    """Resident memory of this process and its children (the engine core and its workers), MiB."""
    import psutil

    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a process that just ended
            total += p.memory_info().rss
    return total / 2**20


async def engine_rows(args, root: Path, lines: list[str]) -> dict:
    """Registry -> slots at the real layer shape, reload from the host cache, decode during loads, soak.

    The engine runs as a server runs it: vLLM's engine core and worker in their own process."""
    from serve_scale import make_base, make_sets
    from vllm import SamplingParams

    from expertlib.engine import AsyncExpertEngine
    from expertlib.registry import Registry

    t = time.perf_counter()
    base_dir = root / "base"
    model = make_base("qwen3-30b-a3b", base_dir, "bfloat16")
    sets = make_sets(model, 3, args.experts)
    del model
    reg = Registry(root / "engine-reg")
    for i, es in enumerate(sets):
        reg.publish(es.save(root / f"e{i}.safetensors"))
    names = [es.manifest.task for es in sets]
    print(f"engine base and {len(sets)} sets built in {time.perf_counter() - t:.0f}s", flush=True)
    # the replaced base experts' digests, computed once per base checkpoint and kept (as by an earlier
    # process that served this base): a server's first load of a set then hashes no base expert
    os.environ["EXPERTLIB_CACHE"] = str(root / "cache")
    from expertlib.checkpoint import BaseCheckpoint

    ckpt, t = BaseCheckpoint(base_dir), time.perf_counter()
    for es in sets[1:]:
        for layer, e in es.manifest.pairs():
            ckpt.expert_digest(layer, e)
    digest_s = (time.perf_counter() - t) / len(sets[1:])
    del ckpt  # its memory maps of the base would count in the soak's resident memory
    engine = AsyncExpertEngine.from_base(
        base_dir,
        slots=2 * args.experts,
        max_sets=2,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=8,
        kv_cache_memory_bytes=256 << 20,
    )
    out: dict = {}
    try:
        # registry -> serving: open (record trusted), workers read, pack and copy into the slots;
        # again: from the workers' host cache, timed next to a memory copy of the set's bytes
        import numpy as np

        data = np.frombuffer(reg.get_path(names[1]).read_bytes(), dtype=np.uint8)
        first, again, first_ratios, ratios = [], [], [], []
        for i in range(2 + args.repeats):
            name = names[1 + i % 2]
            for n in list(engine.loaded_sets()):
                await engine.unload(n)
            reg.get_path(name).read_bytes()  # page cache warm, as the target is stated
            t = time.perf_counter()
            data.copy()
            mem_s = time.perf_counter() - t
            t = time.perf_counter()
            await engine.load(reg.open(name))
            (again if i >= 2 else first).append(time.perf_counter() - t)
            (ratios if i >= 2 else first_ratios).append(mem_s / (again if i >= 2 else first)[-1])
        del data
        out["load_s"] = statistics.median(first)
        out["reload_s"] = statistics.median(again)
        out["reload_ratio"] = statistics.median(ratios)
        out["load_ratio"] = statistics.median(first_ratios)
        lines.append(
            f"- engine (CPU vLLM, bf16, engine core in its own process), per MoE layer: a set from the registry "
            f"into the slots {out['load_s']:.3f} s ({out['load_ratio']:.2f}x a memory copy of its bytes; first loads: "
            f"read once, checked by its ingest record, packed "
            f"for the CPU kernel, copied into the slots; page cache warm, base expert digests kept from an "
            f"earlier process; computing them costs {digest_s:.3f} s per set, once per base); "
            f"{out['reload_s']:.3f} s again from the workers' host cache, end to end "
            f"({out['reload_ratio']:.2f}x a memory copy of its bytes, median of {args.repeats} interleaved pairs)"
        )
        print(lines[-1], flush=True)

        # decode of a resident set's requests, with and without other sets loading meanwhile
        await engine.load(reg.open(names[0]), pin=True)
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        ids = iter(range(10**9))

        async def decode() -> tuple[float, list[float]]:
            """tokens/s of 4 concurrent requests for names[0], and the gaps between tokens of one."""
            gaps: list[float] = []

            async def one(watch: bool) -> int:
                final, last, n = None, time.perf_counter(), 0
                async for o in engine.generate([1, 2, 3, 4], params, f"d{next(ids)}", expert_set=names[0]):
                    now = time.perf_counter()
                    if watch and len(o.outputs[0].token_ids) > n and n > 0:
                        gaps.append(now - last)
                    n, last, final = len(o.outputs[0].token_ids), now, o
                return len(final.outputs[0].token_ids)

            t = time.perf_counter()
            toks = sum(await asyncio.gather(*(one(i == 0) for i in range(4))))
            return toks / (time.perf_counter() - t), gaps

        async def churn(stop: asyncio.Event) -> int:
            k = 0
            while not stop.is_set():
                await engine.load(reg.open(names[1 + k % 2]))  # evicts the other one
                k += 1
                await asyncio.sleep(args.load_gap)
            return k

        await decode()  # warm-up
        pairs, quiet_gaps, busy_gaps, loads_during = [], [], [], 0
        for _ in range(args.repeats):
            quiet, g = await decode()
            quiet_gaps += g
            stop = asyncio.Event()
            task = asyncio.create_task(churn(stop))
            busy, g = await decode()
            busy_gaps += g
            stop.set()
            loads_during += await task
            pairs.append(busy / quiet)
        out["decode_ratio"] = statistics.median(pairs)
        step = statistics.median(quiet_gaps)
        lines.append(
            f"- decode of a resident set's 4 requests while other sets load (one load every "
            f"{args.load_gap:g} s, each evicting the other; {loads_during} loads in all): "
            f"{out['decode_ratio']:.2f}x the tokens/s of the same requests without loads (median of "
            f"{args.repeats} interleaved pairs; target >= 0.9x: {'met' if out['decode_ratio'] >= 0.9 else 'MISSED'}); "
            f"time between tokens without loads {step * 1e3:.0f} ms (median), during loads median "
            f"{statistics.median(busy_gaps) * 1e3:.0f} ms, longest {max(busy_gaps) * 1e3:.0f} ms "
            f"({max(busy_gaps) / step:.1f} steps; the longest without loads {max(quiet_gaps) * 1e3:.0f} ms, "
            f"{max(quiet_gaps) / step:.1f} steps)"
        )
        print(lines[-1], flush=True)

        if args.soak:
            out.update(await soak(engine, reg, names, args.soak, lines))
    finally:
        engine.shutdown()
    return out


async def soak(engine, reg, names: list[str], cycles: int, lines: list[str]) -> dict:
    """`cycles` loads of the two other sets in turn (each evicting the other), an unload every 10th,
    while requests for the pinned set run; every answer equal to its set's reference."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
    ids = iter(range(10**9))

    async def answer(name: str) -> list[int]:
        final = None
        async for o in engine.generate([5, 6, 7], params, f"s{next(ids)}", expert_set=name):
            final = o
        return list(final.outputs[0].token_ids)

    reference = {}
    for n in names[1:]:
        await engine.load(reg.open(n))
        reference[n] = await answer(n)
    reference[names[0]] = await answer(names[0])
    marks, wrong = [], 0
    t = time.perf_counter()
    for i in range(cycles):
        n = names[1 + i % 2]
        running = asyncio.create_task(answer(names[0]))
        await engine.load(reg.open(n))
        wrong += (await answer(n)) != reference[n]
        wrong += (await running) != reference[names[0]]
        if i % 10 == 9:
            await engine.unload(n)
        if i % max(1, cycles // 10) == 0 or i == cycles - 1:
            st = engine.status()
            marks.append(
                (i + 1, tree_rss(), st["slots_used_total"], st["host_cache"].get("bytes", 0) / 2**20)
            )
    seconds = time.perf_counter() - t
    first, last = marks[0], marks[-1]
    lines.append(
        f"- soak: {cycles} load/unload/evict cycles of real-shape sets in {seconds:.0f} s while requests for a "
        f"pinned set ran; {wrong} answers differing from their set's reference (of {2 * cycles}); resident "
        f"memory of the server's processes {first[1]:.0f} -> {last[1]:.0f} MiB (cycle {first[0]} -> {last[0]}; "
        f"every mark: {', '.join(f'{m[1]:.0f}' for m in marks)}), slots in use {', '.join(str(m[2]) for m in marks)} "
        f"(of {engine.status()['slots_total']})"
    )
    print(lines[-1], flush=True)
    return dict(soak_wrong=wrong, soak_rss=(first[1], last[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine", action="store_true", help="also the vLLM engine rows (real-shape model)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per request (--engine)")
    ap.add_argument(
        "--load-gap", type=float, default=0.5, help="seconds between loads while decoding (--engine)"
    )
    ap.add_argument("--soak", type=int, default=0, help="load/unload/evict cycles (--engine)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    args = ap.parse_args()

    nbytes = make_set(args.experts).nbytes
    rows, lines = Rows(nbytes), []
    root = Path(tempfile.mkdtemp(prefix="bench-loadspeed-"))
    t0 = time.perf_counter()
    try:
        lib = library_rows(args, root, rows)
        eng = asyncio.run(engine_rows(args, root, lines)) if args.engine else {}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_layer = eng.get("load_s", lib["ingest_s"] + lib["slot_s"])
    full = MOE_LAYERS * per_layer
    how = "engine load" if "load_s" in eng else "registry load + slot copy, library only"
    lines.append(
        f"- extrapolated, registry to serving a full-depth Qwen3-30B-A3B set ({MOE_LAYERS} MoE layers, "
        f"{MOE_LAYERS * nbytes / 2**30:.2f} GiB): {MOE_LAYERS} x {per_layer:.3f} s ({how}) = {full:.1f} s "
        f"(target < 5 s: {'met' if full < 5 else 'MISSED'})"
    )
    text = "\n".join(rows.table() + ["", lib["extra"]] + lines)
    print("\n" + text)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s)")
    if not args.no_write:
        from results import write_section

        load = os.getloadavg()[0]
        head = (
            f"{date.today()}, `python bench/load_speed.py --repeats {args.repeats}"
            + (" --engine" if args.engine else "")
            + (f" --soak {args.soak}" if args.soak else "")
            + f"`, {os.cpu_count()} CPUs, load average {load:.1f} at the end (other jobs on the machine)."
        )
        method = (
            "Method: each step timed right next to its baseline on the same bytes, interleaved "
            f"{args.repeats} times; the ratio is the median of the per-pair ratios, the time the step's median."
        )
        write_section(SECTION, f"{SECTION}\n\n{head}\n{method}\n\n{text}")


if __name__ == "__main__":
    main()
