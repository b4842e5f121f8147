"""Engine loads at real size: a set from the registry into a running vLLM engine's slots, first from its
file (never seen: read, packed for the CPU kernel), then published while the engine runs and packed
ahead of its first request (`AsyncExpertEngine.prepack`, what `serve --prepack` does while idle), then
from the packed-set disk cache (seen before, as by a new server process), then from the workers' host
cache; other sets' decode while sets load; and a load/unload/evict soak. Each load timed next to a memory copy of the same bytes.

    python bench/engine_load.py [--experts 16] [--repeats 5] [--soak 1000] [--no-write]

The base has one MoE layer with the real Qwen3-30B-A3B layer shapes (bench/serve_scale.py's base,
vocabulary cut to 8192); a set is 16 of its 128 experts, 144 MiB in bf16. The engine runs as a server
runs it: vLLM's engine core and worker in their own process. Full-depth figures are 48 x the per-layer
ones. `--soak N` runs N load/unload/evict cycles while requests for a pinned set run: every answer
equal to its set's reference, the processes' resident memory and the slots in use printed along the
way (flat is the target). `python bench/load_speed.py --engine` runs the same rows after its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MOE_LAYERS = 48  # Qwen3-30B-A3B
SECTION = "## Engine loads at real size (issue 21: registry to serving, decode during loads, soak)"


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
    """Registry -> slots at the real layer shape (never seen, packed-set cache, host cache), decode
    during loads, soak. Returns the per-layer figures (load_s: a never-seen set's first load)."""
    import numpy as np
    from serve_scale import make_base, make_sets
    from vllm import SamplingParams

    from expertlib.engine import AsyncExpertEngine
    from expertlib.registry import Registry

    t = time.perf_counter()
    base_dir = root / "base"
    model = make_base("qwen3-30b-a3b", base_dir, "bfloat16")
    fresh = 2 + args.repeats  # never-seen sets: one first load each
    # and sets published while the server runs, packed ahead of their first request
    # and never-seen sets loaded back to back, each while the one before it is still written to the
    # packed-set cache (a burst of first requests)
    sets = make_sets(model, 1 + fresh + 2 * args.repeats, args.experts)
    del model
    reg = Registry(root / "engine-reg")
    for i, es in enumerate(sets):
        reg.publish(es.save(root / f"e{i}.safetensors"))
        (root / f"e{i}.safetensors").unlink()
    names = [es.manifest.task for es in sets]
    print(f"engine base and {len(sets)} sets built in {time.perf_counter() - t:.0f}s", flush=True)
    # the replaced base experts' digests, computed once per base checkpoint and kept (as by an earlier
    # process that served this base): a server's first load of a set then hashes no base expert; the
    # packed-set cache starts empty
    os.environ["EXPERTLIB_CACHE"] = str(root / "cache")
    from expertlib.checkpoint import BaseCheckpoint

    ckpt, t = BaseCheckpoint(base_dir), time.perf_counter()
    for es in sets[1:]:
        for layer, e in es.manifest.pairs():
            ckpt.expert_digest(layer, e)
    digest_s = (time.perf_counter() - t) / len(sets[1:])
    del ckpt, sets  # its memory maps of the base would count in the soak's resident memory
    phases(reg, names[1 : 1 + fresh], root, args.repeats, lines)
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
        data = np.frombuffer(reg.get_path(names[1]).read_bytes(), dtype=np.uint8)

        async def timed_load(name: str, before=None) -> tuple[float, float]:
            """(load seconds, seconds of a memory copy of the set's bytes just before it)."""
            for n in list(engine.loaded_sets()):
                await engine.unload(n)
            if before is not None:
                await before()
            reg.get_path(name).read_bytes()  # page cache warm, as the target is stated
            t = time.perf_counter()
            data.copy()
            mem_s = time.perf_counter() - t
            t = time.perf_counter()
            opened = await asyncio.to_thread(engine._book.open, reg.open(name), None)
            front.append(time.perf_counter() - t)  # the front end's checks (record, base, bounds)
            await engine.load(opened)
            took = time.perf_counter() - t
            cache = (await engine._rpc("expertlib_host_cache", ()))[0]
            jobs.append(cache["last_job_seconds"])
            waits.append(cache["last_job_waited"])  # for the job before it (its tail) to end
            tails.append(cache["last_tail_seconds"])  # the job before it, after its slots were written
            return took, mem_s

        async def empty_host_cache() -> None:  # what a new server process starts with
            await engine._rpc("expertlib_host_cache", (0,))
            await engine._rpc("expertlib_host_cache", (engine._book.host_cache_budget,))

        def row(key: str, pairs: list[tuple[float, float]]) -> None:
            out[f"{key}_s"] = statistics.median(s for s, _ in pairs)
            out[f"{key}_ratio"] = statistics.median(m / s for s, m in pairs)

        # never seen: read once (its ingest record stands), packed for the CPU kernel, copied into the slots
        front: list[float] = []
        jobs: list[float] = []
        waits: list[float] = []
        tails: list[float] = []
        firsts = []
        for n in names[1 : 1 + fresh]:
            firsts.append(await timed_load(n))
            # its background write into the packed-set cache done before the next load (not timed)
            packed = (await engine._rpc("expertlib_packed_cache", (None, None, True)))[0]
        row("load", firsts)
        first_front, first_job = statistics.median(front), statistics.median(jobs)
        first_wait, first_tail = statistics.median(waits), statistics.median(tails[1:] or [0.0])
        host = (await engine._rpc("expertlib_host_cache", ()))[0]
        print(
            f"host-cache copies: {host['reused_bytes'] >> 20} MiB on spare memory, {host['fresh_bytes'] >> 20} MiB fresh"
        )
        print(
            f"never-seen loads {[round(s, 3) for s, _ in firsts]}, jobs {[round(s, 3) for s in jobs]}, "
            f"waits for the previous tail {[round(s, 3) for s in waits]}, tails {[round(s, 3) for s in tails]}",
            flush=True,
        )
        front.clear()
        jobs.clear()
        # published while the server runs: packed ahead while the engine is idle (what the server's
        # Prepacker has it do), then requested; timed from the request
        prepack_s, ahead = [], []
        for n in names[1 + fresh : 1 + fresh + args.repeats]:
            t = time.perf_counter()
            result = await engine.prepack(reg.open(n))
            prepack_s.append(time.perf_counter() - t)
            assert result["outcome"] == "packed", result
            ahead.append(await timed_load(n))
        row("ahead", ahead)
        front.clear()
        jobs.clear()
        # again, from the workers' host cache (the rows packed last, which it still holds)
        row("reload", [await timed_load(names[fresh - i % 2]) for i in range(args.repeats)])
        # seen before, host cache empty (a new server process): the packed-set cache read into the slots
        row("disk", [await timed_load(names[1 + i], empty_host_cache) for i in range(args.repeats)])
        st = (await engine._rpc("expertlib_packed_cache", ()))[0]
        # a burst: never-seen sets one after the other, no wait for the previous one's cache write
        burst_names = names[1 + fresh + args.repeats : 1 + fresh + 2 * args.repeats]
        front.clear()
        jobs.clear()
        waits.clear()
        tails.clear()
        burst = [await timed_load(n) for n in burst_names]
        row("burst", burst)
        print(
            f"burst loads {[round(s, 3) for s, _ in burst]}, front end {[round(s, 3) for s in front]}, "
            f"jobs {[round(s, 3) for s in jobs]}, waits for the previous tail {[round(s, 3) for s in waits]}, "
            f"tails {[round(s, 3) for s in tails]}",
            flush=True,
        )
        await engine._rpc("expertlib_packed_cache", (None, None, True))
        lines.append(
            f"- engine (CPU vLLM, bf16, engine core in its own process), per MoE layer, page cache warm, each "
            f"load timed next to a memory copy of the set's bytes (median of the pairs):\n"
            f"  - a never-seen set from the registry into the slots: {out['load_s']:.3f} s "
            f"({out['load_ratio']:.2f}x a memory copy; {fresh} sets, each loaded once: read once, checked by its "
            f"ingest record, packed for the CPU kernel, copied into the slots; base expert digests kept from an "
            f"earlier process (computing them costs {digest_s:.3f} s per set, once per base); of it the front "
            f"end's checks {first_front:.3f} s, waiting for the previous load's tail (its copy kept in the host "
            f"cache) {first_wait:.3f} s (that tail itself {first_tail:.3f} s) and the worker's job until its slots "
            f"were written {first_job:.3f} s (medians), the rest RPCs and polls)\n"
            f"  - a set published while the server runs, requested after its pre-pack (packed ahead while "
            f"the engine was idle, {statistics.median(prepack_s):.3f} s in the background): {out['ahead_s']:.3f} s "
            f"from the request to serving ({out['ahead_ratio']:.2f}x a memory copy; {args.repeats} sets)\n"
            f"  - a set packed before, the host cache empty (as in a new server process): {out['disk_s']:.3f} s "
            f"({out['disk_ratio']:.2f}x a memory copy; the packed-set disk cache's bytes read straight into the "
            f"slot rows; {st['hits']} cache hits, {st['refused']} refused, {packed['written']} entries written "
            f"in the background, {packed['bytes'] / 2**20:.0f} MiB)\n"
            f"  - again from the workers' host cache: {out['reload_s']:.3f} s ({out['reload_ratio']:.2f}x a "
            f"memory copy)\n"
            f"  - a burst of never-seen sets, each requested as the one before it is served (its packed-set "
            f"cache write and host-cache copy still running): {out['burst_s']:.3f} s ({out['burst_ratio']:.2f}x "
            f"a memory copy; {len(burst_names)} sets)"
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
    for key, what in (
        ("load", "a never-seen set (requested the moment it lands, before any pre-pack)"),
        ("burst", "a never-seen set in a burst of them (the previous one's cache write still running)"),
        ("ahead", "a set published while the server runs, requested after its pre-pack"),
        ("disk", "a set packed before (packed-set cache)"),
        ("reload", "from the host cache"),
    ):
        full = MOE_LAYERS * out[f"{key}_s"]
        lines.append(
            f"- extrapolated, registry to serving a full-depth Qwen3-30B-A3B set ({MOE_LAYERS} MoE layers), "
            f"{what}: {MOE_LAYERS} x {out[f'{key}_s']:.3f} s = {full:.1f} s (target < 5 s: "
            f"{'met' if full < 5 else 'MISSED'})"
        )
    return out


def phases(reg, names: list[str], root: Path, repeats: int, lines: list[str]) -> dict:
    """Where a load's time goes, each step of the workers' job run alone on one thread, on sets from
    the registry (page cache warm), next to a memory copy: open (header, manifest, ingest record),
    read (into one fresh buffer; the record stands, so no hashing), pack (CPU prepack into fresh rows),
    copy (rows into slot rows), the load's path now (map the file, pack from the map into slot rows),
    and a packed-set cache read straight into slot rows."""
    import numpy as np
    import torch

    from expertlib.vllm_plugin.packcache import PackedCache
    from expertlib.vllm_plugin.testing import cpu_moe_runner
    from expertlib.vllm_plugin.worker import (
        _pack_into,
        copy_rows,
        kernel_layout,
        pack_rows,
        packed_layers,
        slot_parts,
    )

    before = torch._C.get_num_threads()
    torch._C.set_num_threads(1)  # as the job runs
    try:
        es = reg.open(names[0])
        m = es.manifest
        (layer,) = {layer for layer, _ in m.pairs()}
        experts = sorted(e for _, e in m.pairs())
        gate = es.read_verified().expert(layer, experts[0]).gate
        runner = cpu_moe_runner(len(experts), gate.shape[0], gate.shape[1], gate.dtype, 0.0)
        slots = list(range(len(experts)))
        cache = PackedCache(root / "phases-packed", budget=1 << 40)
        data = np.frombuffer(reg.get_path(names[0]).read_bytes(), dtype=np.uint8)
        keys = ("memory copy", "open", "read", "pack", "copy", "map", "into slots", "disk")
        times: dict[str, list[float]] = {k: [] for k in keys}
        for i in range(repeats):
            name = names[i % len(names)]
            reg.get_path(name).read_bytes()  # page cache warm
            t = time.perf_counter()
            data.copy()
            times["memory copy"].append(time.perf_counter() - t)
            t = time.perf_counter()
            es = reg.open(name)
            times["open"].append(time.perf_counter() - t)
            m = es.manifest
            experts = sorted(e for _, e in m.pairs())  # each set replaces its own experts
            t = time.perf_counter()
            es.read_verified()
            times["read"].append(time.perf_counter() - t)
            t = time.perf_counter()
            rows = pack_rows(runner, experts, [es.expert(layer, e) for e in experts])
            times["pack"].append(time.perf_counter() - t)
            t = time.perf_counter()
            copy_rows(runner, slots, rows, experts)
            times["copy"].append(time.perf_counter() - t)
            dst = runner.routed_experts
            packer = kernel_layout(dst, tuple(rows.w13.shape), tuple(rows.w2.shape))
            mapped = reg.open(name)
            t = time.perf_counter()  # what a load now does: the file mapped (the record stands), and
            mapped.map_verified()
            times["map"].append(time.perf_counter() - t)
            weights = [mapped.expert(layer, e) for e in experts]
            t = time.perf_counter()  # packed from the map straight into the slot rows
            _pack_into(
                packer,
                weights,
                [dst.w13_weight[s : s + 1] for s in slots],
                [dst.w2_weight[s : s + 1] for s in slots],
            )
            times["into slots"].append(time.perf_counter() - t)
            cache.save(m.content_digest, "phases", packed_layers({layer: rows}))
            del es, rows, mapped, weights
            rec = cache.record(m.content_digest, "phases")
            parts = slot_parts(runner.routed_experts)
            targets = [
                (layer, p, e, parts[p][s]) for s, e in zip(slots, experts, strict=True) for p in ("w13", "w2")
            ]
            t = time.perf_counter()
            assert cache.read_into(rec, targets)
            times["disk"].append(time.perf_counter() - t)
    finally:
        torch._C.set_num_threads(before)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines.append(
        f"- where a load's time goes (each step of the workers' job alone, one thread, median of {repeats}; "
        f"a memory copy of the set's bytes {med['memory copy']:.3f} s in the same pairs): a never-seen set = open "
        f"{med['open']:.3f} s + read into one buffer {med['read']:.3f} s + CPU prepack into the host-cache rows "
        f"{med['pack']:.3f} s + copy into the slots {med['copy']:.3f} s = {sum(med[k] for k in ('open', 'read', 'pack', 'copy')):.3f} s "
        f"(the earlier path), or open + map the file {med['map']:.3f} s + CPU prepack from the map straight into the "
        f"slot rows {med['into slots']:.3f} s = {sum(med[k] for k in ('open', 'map', 'into slots')):.3f} s (the load's "
        f"path now: no read into a buffer, slot memory is faulted in already, fresh host rows are not; the host-cache "
        f"copy is made after the load is done; with no request running the packing is split over two threads); "
        f"a set packed before = open {med['open']:.3f} s (front end) + packed-set cache read into the slots "
        f"{med['disk']:.3f} s; the rest of an engine load is the front end's checks, the RPCs and polls, and "
        f"sharing the cores with the forward steps"
    )
    print(lines[-1], flush=True)
    return med


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
    for n in names[1:3]:
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
    packed = engine.status()["host_cache"].get("packed", {})
    lines.append(
        f"- soak: {cycles} load/unload/evict cycles of real-shape sets in {seconds:.0f} s while requests for a "
        f"pinned set ran; {wrong} answers differing from their set's reference (of {2 * cycles}); resident "
        f"memory of the server's processes {first[1]:.0f} -> {last[1]:.0f} MiB (cycle {first[0]} -> {last[0]}; "
        f"every mark: {', '.join(f'{m[1]:.0f}' for m in marks)}), slots in use {', '.join(str(m[2]) for m in marks)} "
        f"(of {engine.status()['slots_total']}), host cache {', '.join(f'{m[3]:.0f}' for m in marks)} MiB; "
        f"packed-set cache after it: {packed.get('hits', 0)} hits, {packed.get('refused', 0)} refused, "
        f"{packed.get('bytes', 0) / 2**20:.0f} MiB"
    )
    print(lines[-1], flush=True)
    return dict(soak_wrong=wrong, soak_rss=(first[1], last[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per request")
    ap.add_argument("--load-gap", type=float, default=0.5, help="seconds between loads while decoding")
    ap.add_argument("--soak", type=int, default=0, help="load/unload/evict cycles")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    args = ap.parse_args()

    lines: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="bench-engineload-"))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    try:
        asyncio.run(engine_rows(args, root, lines))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    text = "\n".join(lines)
    print("\n" + text)
    print(f"\n(wall {wall:.0f} s)")
    if not args.no_write:
        from results import write_section

        head = (
            f"{date.today()}, `python bench/engine_load.py --repeats {args.repeats} --tokens {args.tokens}"
            + (f" --soak {args.soak}" if args.soak else "")
            + f"`, {os.cpu_count()} CPUs shared with other jobs (load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end); run took {wall / 60:.1f} min."
        )
        write_section(SECTION, f"{SECTION}\n\n{head}\n\n{text}")


if __name__ == "__main__":
    main()
