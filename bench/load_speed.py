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

`--engine` adds what needs a vLLM engine (bench/engine_load.py's rows, which `make bench-scale` runs
on their own into their own section): a set from the registry into the slots (never seen, packed
before, from the host cache; the full-depth extrapolation: 48 x that), the decode tokens/s of
requests for a resident set while other sets load against the same requests without loads,
interleaved, and with `--soak N` N load/unload/evict cycles of real-shape sets while requests for a
pinned set run (every answer equal to its set's reference, resident memory and slots flat).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

H, INTER, MOE_LAYERS = 2048, 768, 48  # Qwen3-30B-A3B
SECTION = "## Moving sets at real size (issue 21: verify once, one-pass copies, loads without stalls)"


class Pair(NamedTuple):
    """Medians of `paired`'s interleaved runs."""

    step_s: float
    base_s: float
    ratio: float  # median of baseline/step over adjacent pairs
    step_cpu: float  # CPU seconds (user + system, every thread; `cpu`'s processes)
    base_cpu: float


def paired(step, baseline, repeats: int, setup=None, cpu=time.process_time) -> Pair:
    """Step and baseline timed in adjacent pairs, wall and CPU (`cpu()`: cumulative CPU seconds of
    the processes doing the work; on a shared machine CPU seconds are what contention cannot change)."""
    runs = []
    for _ in range(repeats):
        c, t = cpu(), time.perf_counter()
        baseline()
        b, bc = time.perf_counter() - t, cpu() - c
        if setup is not None:
            setup()
        c, t = cpu(), time.perf_counter()
        step()
        runs.append((time.perf_counter() - t, b, cpu() - c, bc))
    med = lambda i: statistics.median(r[i] for r in runs)  # noqa: E731
    return Pair(med(0), med(1), statistics.median(r[1] / r[0] for r in runs), med(2), med(3))


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used, from /proc (0.0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        self.rows: list[tuple[str, Pair, str, float]] = []

    def add(self, what: str, pair: Pair, vs: str, target: float) -> None:
        self.rows.append((what, pair, vs, target))
        print(
            f"  {what}: {pair.step_s:.3f} s, {pair.ratio:.2f}x {vs} (target >= {target}x); "
            f"cpu {pair.step_cpu:.3f} s against {pair.base_cpu:.3f}",
            flush=True,
        )

    def table(self) -> list[str]:
        out = [
            f"| step ({self.nbytes / 2**20:.0f} MiB, one Qwen3-30B-A3B MoE layer) | s | MB/s | vs | ratio | target | | cpu-s (step / vs) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for what, p, vs, target in self.rows:
            ok = "met" if p.ratio >= target else "MISSED"
            mbs = self.nbytes / p.step_s / 1e6
            out.append(
                f"| {what} | {p.step_s:.3f} | {mbs:.0f} | {vs} | {p.ratio:.3f}x | >= {target}x | {ok} "
                f"| {p.step_cpu:.3f} / {p.base_cpu:.3f} |"
            )
        return out

    def summary(self, prefix: str) -> list[str]:
        """The rows whose step starts with one of `prefix`'s words, one line each against its target."""
        out = []
        for what, p, vs, target in self.rows:
            if what.split(" ")[0] in prefix.split():
                ok = "met" if p.ratio >= target else "MISSED"
                out.append(
                    f"  {what.split(' (')[0]:<34} {p.ratio:.3f}x {vs} (target >= {target}x: {ok}); "
                    f"{p.step_s:.3f} s against {p.base_s:.3f} s; cpu {p.step_cpu:.3f} s against {p.base_cpu:.3f} s"
                )
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
    os.sync()  # the files on disk before anything is timed, as a file someone publishes usually is
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

    def fcopy(sync: bool = False, src: Path = files[0]) -> None:
        """A file copy into a new file (as into a registry), the previous copy removed first."""
        shutil.rmtree(root / "copies", ignore_errors=True)
        (root / "copies").mkdir()
        dst = root / "copies" / f"{next(copies)}.bin"
        shutil.copyfile(src, dst)
        if sync:
            with open(dst, "rb+") as f:
                os.fsync(f.fileno())

    # a never-seen set: read into host memory once + the full check (the worker's path)
    fresh = iter(files[1:])
    p = paired(lambda: ExpertSet.open(next(fresh)).read_verified(), sha, n, verify._CHECKED.clear)
    rows.add("first load of a never-seen set (read + full check)", p, "sha256 1 core", 0.8)

    # publish: one pass (copy + blob hash + the patch's own check), each publish timed next to a
    # copy of the file it publishes (the same bytes, in the same state), into a registry emptied
    # before each (its index made untimed), as push and pull below. Measured on a 2-CPU VM: once a
    # few GiB of new files were written and kept, each further 144 MiB written into a file that is
    # kept cost ~0.5 cpu-s in the kernel's memcpy instead of ~0.05 (a plain copy_file_range alike),
    # while files written where others were just deleted stayed at ~0.05; the baseline copy deletes
    # the one before it, so the step must too to be compared on equal terms
    def empty(path: Path):
        def setup() -> None:
            shutil.rmtree(path, ignore_errors=True)
            Registry(path).list()

        return setup

    pubs, publishing = iter(files), []
    p = paired(
        lambda: Registry(root / "pub").publish(publishing[-1]),
        lambda: publishing.append(next(pubs)) or fcopy(src=publishing[-1]),
        min(n, len(files)),
        empty(root / "pub"),
    )
    shutil.rmtree(root / "pub", ignore_errors=True)
    reg = Registry(root / "reg")
    reg.publish(files[0])  # the registry the rows below read, push from and serve
    rows.add("publish (one pass: copy + blob hash + full check)", p, "file copy", 0.5)
    synced, plain = paired(lambda: fcopy(True), fcopy, n)[:2]
    extra = f"- the registry fsyncs each blob before it enters: a file copy + fsync takes {synced:.3f} s, {plain:.3f} s without"

    # a registry blob verified at ingest, page cache warm: the record stands, bytes read once
    task = sets[0].manifest.task
    p = paired(lambda: reg.open(task).read_verified(), mem, n, verify._CHECKED.clear)
    rows.add("load of a registry blob verified at ingest (warm)", p, "memory copy", 0.5)
    ingest_s = p.step_s

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
    p = paired(lambda: copy_rows(slots, ids, cached, cached.experts), mem, n)
    rows.add("reload from the host cache into slot rows", p, "memory copy", 0.8)
    slot_s = p.step_s

    # folder push and pull, each into an existing registry without the set (created untimed: making a
    # registry's index is a one-time cost, not part of moving a set)
    remote = root / "remote"
    p = paired(lambda: reg.push(task, str(remote)), fcopy, n, empty(remote))
    rows.add("push to a folder remote", p, "file copy", 0.5)
    p = paired(lambda: Registry(root / "pulled").pull(str(remote)), fcopy, n, empty(root / "pulled"))
    rows.add("pull from a folder remote", p, "file copy", 0.5)

    # HTTP pull over loopback (a registry server in another process, on 127.0.0.1); CPU seconds of
    # both processes
    with _serve(reg.root) as (url, pid):
        p = paired(
            lambda: Registry(root / "http").pull(url + "/v1/registry", [task]),
            fcopy,
            n,
            empty(root / "http"),
            cpu=lambda: time.process_time() + process_cpu(pid),
        )
    rows.add("pull over HTTP (loopback)", p, "file copy", 0.3)
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
    """Serve the registry at `root` over HTTP on 127.0.0.1 from another process; yields its URL and
    the process id."""
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
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.join(10)

    return run()


# --- with a vLLM engine: bench/engine_load.py ---------------------------------------------------------------


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
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        lib = library_rows(args, root, rows)
        if args.engine:
            from engine_load import engine_rows

            eng = asyncio.run(engine_rows(args, root, lines))
        else:
            eng = {}
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
    summary = ["", "moving a set (issue 21), each ratio the median of adjacent pairs:"]
    summary += rows.summary("publish push pull")
    text = "\n".join(rows.table() + ["", lib["extra"]] + lines + summary)
    print("\n" + text)
    load = f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"\n(wall {time.perf_counter() - t0:.0f} s, {load})")
    if not args.no_write:
        from results import write_section

        head = (
            f"{date.today()}, `python bench/load_speed.py --repeats {args.repeats}"
            + (" --engine" if args.engine else "")
            + (f" --soak {args.soak}" if args.soak else "")
            + f"`, {os.cpu_count()} CPUs, {load} (other jobs on the machine)."
        )
        method = (
            "Method: each step timed right next to its baseline on the same bytes, interleaved "
            f"{args.repeats} times; the ratio is the median of the per-pair ratios, the time the step's median."
        )
        write_section(SECTION, f"{SECTION}\n\n{head}\n{method}\n\n{text}")


if __name__ == "__main__":
    main()
