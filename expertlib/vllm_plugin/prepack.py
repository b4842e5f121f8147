"""Packing sets ahead of their first request: a set the server expects (the registry's) is packed into
the packed-set disk cache (`packcache.py`) while the engine is idle, so that its first load is the
cache's read straight into the slots instead of a read, a check and a CPU prepack.

The work runs on a thread of its own in each worker (`PrepackJob`), one small piece at a time: the
set's file read and checked (as every load checks it: the front end's record of an unchanged file, or
every byte hashed) and mapped into memory (no buffer of its size), then one MoE layer packed and appended to the cache's data file per piece. A piece
runs only when the front end grants it (`expertlib_prepack` RPC), which it does while no request runs
and no set loads; so a request that arrives waits for at most the piece in progress, and the job
resumes where it stopped. It writes the disk cache only (never a slot, the host cache or the loads'
read buffer), into the free part of the cache's bound: it never removes an entry to make room.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger(__name__)

#: What a job's pieces generator returns: its outcome, "packed", "cached" (the cache holds it
#: already), "no room" or "off" (the cache is), "packing elsewhere" (another process packs it now),
#: and the bytes it wrote
Pieces = Generator[None, None, tuple[str, int]]


class PrepackJob(threading.Thread):
    """One set packed ahead, a piece at a time, each piece granted by `grant`."""

    def __init__(self, key: Any, pieces: Callable[[], Pieces]):
        super().__init__(name="expertlib-prepack", daemon=True)
        self.key = key
        self._pieces = pieces
        self._go = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.running = False  # a granted piece is in progress
        self.done = False
        self.abandoned = False
        self.outcome = ""  # when done: packed, cached, no room, abandoned or "failed: why"
        self.nbytes = 0  # written to the cache
        self.pieces = 0
        self.start()

    def grant(self) -> None:
        """Let the next piece run, unless one is running or the job is done."""
        with self._lock:
            if self.running or self.done:
                return
            self.running = True
        self._go.release()

    def abandon(self) -> None:
        """End the job at its next piece boundary, writing nothing."""
        with self._lock:
            self.abandoned = True
        self._go.release()

    def run(self) -> None:
        from expertlib.vllm_plugin.hostcache import _anywhere, _one_intraop_thread

        _anywhere()
        outcome, nbytes = "abandoned", 0
        try:
            with _one_intraop_thread():
                gen = self._pieces()
                try:
                    while True:
                        self._go.acquire()
                        if self.abandoned:
                            break
                        try:
                            next(gen)
                        except StopIteration as stop:
                            outcome, nbytes = stop.value
                            break
                        with self._lock:
                            self.pieces += 1
                            self.running = False
                finally:
                    gen.close()  # an abandoned job's partial file is removed
        except Exception as exc:  # a set that cannot be packed is skipped, never an engine error
            log.warning("expertlib: a set was not packed ahead: %s", exc)
            outcome = f"failed: {exc}"
        with self._lock:
            self.outcome, self.nbytes, self.running, self.done = outcome, nbytes, False, True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "done": self.done,
                "running": self.running,
                "outcome": self.outcome,
                "bytes": self.nbytes,
                "pieces": self.pieces,
            }


class Prepacker:
    """This worker's job of packing ahead (at most one at a time)."""

    def __init__(self) -> None:
        self.job: PrepackJob | None = None

    def advance(self, key: Any, pieces: Callable[[], Pieces]) -> dict[str, Any]:
        """Run the next piece of the job for `key` (started when it is not the job in progress, which
        is then abandoned) and report it; a piece still running is left to finish."""
        job = self.job
        if job is None or job.key != key:
            if job is not None:
                job.abandon()
            job = self.job = PrepackJob(key, pieces)
        job.grant()
        return job.status()

    def finish(self, key: Any) -> None:
        """The front end is done with the job for `key`: drop it (abandoned if not done)."""
        job = self.job
        if job is not None and job.key == key:
            job.abandon()
            self.job = None


def pack_pieces(
    ctx,
    cache,
    path: str,
    content_digest: str,
    checked: str | None,
    *,
    layout: str,
    pack_rows: Callable,
    row_bytes: Callable[[int], int],
) -> Pieces:
    """The pieces of packing the set at `path` into `cache` for this worker's slots (`ctx`; the
    worker's `layout`, `pack_rows` (runner, experts, weights, reuse) -> LayerRows, and `row_bytes(layer)`:
    one expert's packed bytes there): the file opened, read and checked (the front end's
    VerifiedRecord `checked` of the unchanged file, else every byte hashed: a damaged file fails
    here, nothing written) and memory-mapped, then one MoE layer per piece appended to the entry,
    committed only while the file is still as it was checked, and only into the bound's free space."""
    from expertlib.errors import DigestMismatchError
    from expertlib.patch import ExpertSet
    from expertlib.verify import VerifiedRecord

    if not cache.enabled or cache.budget <= 0:
        return "off", 0
    if cache.holds(content_digest, layout):
        return "cached", 0
    es = ExpertSet.open(path)
    if es.manifest.content_digest != content_digest:
        raise DigestMismatchError("the set file is not the set the server checked", path=path)
    by_layer: dict[int, list[int]] = {}
    for layer, e in es.manifest.pairs():
        if int(layer) not in ctx.layers:
            raise ValueError(f"the set replaces experts of layer {layer}, which is not a MoE layer here")
        by_layer.setdefault(int(layer), []).append(int(e))
    size = sum(len(experts) * row_bytes(layer) for layer, experts in by_layer.items())
    if size > cache.free():
        return "no room", 0
    claim = cache.claim(content_digest, layout)
    if claim is None:  # another process (a replica) packs it now: asked again on the next round
        return "packing elsewhere", 0
    with claim:
        if checked:
            es.trust(VerifiedRecord.model_validate_json(checked))
        yield
        state = es.map_verified()  # a memory map, not a buffer of the set's size (GiB at full depth)
        rows = None  # one layer's rows, written again for the next layer once on disk
        with cache.writer(content_digest, layout) as out:
            for layer, experts in sorted(by_layer.items()):
                yield
                experts = sorted(experts)
                weights = [es.expert(layer, e) for e in experts]
                rows = pack_rows(ctx.layers[layer], experts, weights, rows)
                out.add(layer, rows.experts, rows.parts())
            yield
            es.still_as_mapped(state, "packed ahead")  # bytes written after the check: pack none of it
            if cache.holds(content_digest, layout):  # a load of it wrote its own meanwhile
                return "cached", 0
            return ("packed", out.nbytes) if out.commit(evict=False) is not None else ("no room", 0)


#: This process's packing ahead (each vLLM worker process has its own).
PREPACK = Prepacker()
