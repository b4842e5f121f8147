"""The second-level cache of expert sets on each worker: recently used sets in host memory, in the
kernel's final layout.

Like vLLM's CPU LoRA cache, it holds the sets most recently written into slots (resident ones
included), bounded in bytes, so that reloading a set that was evicted from the slots is one copy per
expert part from host memory: no file read, no check, no CPU prepack. A set enters once: its file read
into one buffer and checked (or covered by the front end's check of the unchanged file,
`expertlib.verify`), then packed (`prepare`) into the rows the slots take; the read buffer is let go.
Keyed by the set file's path and content digest; one cache per worker process.

A load's work (read, check, pack, copy into free slots) runs as one job, inline or on a thread of its
own (`stage`), so that forward steps go on meanwhile: the slots it writes are referenced by no set row
until the front end writes the set's row, after the job is done.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from expertlib.patch import ExpertSet
from expertlib.verify import VerifiedRecord

#: What a set is kept as: whatever `prepare` made of it (the worker's packed rows per layer)
Entry = Any


class HostCache:
    def __init__(self, budget: int = 0):
        self.budget = int(budget)
        self._sets: OrderedDict[str, tuple[str, Entry, int]] = OrderedDict()  # path -> (digest, entry, bytes)
        self.hits = 0
        self.misses = 0
        self._staged: dict[str, tuple[str, Entry]] = {}  # for a load in progress, whatever the budget
        self._reading: dict[Hashable, _Job] = {}  # the background job (`stage`): at most one
        self._lock = threading.Lock()
        self.last_job_seconds = 0.0  # the last background job's time until its slots were written
        self.last_job_cpus = ""  # the CPUs its thread could run on, as the kernel says (Cpus_allowed_list)
        self.last_job_waited = 0.0  # how long it waited for the job before it (that job's tail) to end
        self.last_tail_seconds = 0.0  # the last finished job's time after its slots were written
        self._asked: dict[Hashable, float] = {}  # when a load first asked for a job not yet started
        self._spare = SpareMemory()  # the memory of entries let go, written again by later copies
        self.reused_bytes = self.fresh_bytes = 0  # what `empty` handed out: spare memory, fresh memory

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._sets.values())

    def holds(self, path: str, content_digest: str | None) -> bool:
        """Whether `entry` would take this set from memory (staged by the load or kept)."""
        path = str(path)
        with self._lock:
            for got in (self._staged.get(path), self._sets.get(path)):
                if got is not None and content_digest in (None, got[0]):
                    return True
        return False

    def entry(
        self,
        path: str,
        content_digest: str | None,
        checked: VerifiedRecord | None,
        prepare: Callable[[ExpertSet], Entry],
        size: Callable[[Entry], int],
        made: Callable[[str, Entry], None] | None = None,
    ) -> Entry:
        """The set at `path` as `prepare` makes it from its checked bytes: from this cache when it
        holds that set, else read from the file once and checked (`checked`: a full check of the file
        made elsewhere, trusted while the file is unchanged since), then prepared and kept; `made` is
        then called with the set's content digest and what was made (the packed-set disk cache)."""
        path = str(path)
        with self._lock:
            staged = self._staged.get(path)
            if staged is not None and content_digest in (None, staged[0]):
                return staged[1]
            cached = self._sets.get(path)
            if cached is not None and content_digest in (None, cached[0]):
                self._sets.move_to_end(path)
                self.hits += 1
                self._staged[path] = cached[:2]
                return cached[1]
            if cached is not None:  # the file now holds another set
                self._sets.pop(path)
        es = ExpertSet.open(path)
        if checked is not None:
            es.trust(checked)
        es.read_verified(scratch=READ_BUFFER)  # each byte read once, into the buffer the rows are made from
        digest = es.manifest.content_digest
        if content_digest is not None and digest != content_digest:
            from expertlib.errors import DigestMismatchError

            raise DigestMismatchError("the set file changed after it was checked", path=path)
        entry = prepare(es)
        del es  # the read buffer: the entry holds what the slots take
        with self._lock:
            self.misses += 1
            self._staged[path] = (digest, entry)
            self._put(path, digest, entry, size(entry))
        if made is not None:
            made(digest, entry)
        return entry

    def stage(
        self, key: Hashable, work: Callable[[], Any], background: bool = False, wait: float = 0.0
    ) -> bool:
        """Run a load's `work` (reading, checking, packing, slot copies); True once it is done.

        `background`: on a thread of its own (file reads, hashing, numpy and torch copies release the
        GIL, so forward steps go on), False until it is done (call again with the same `key` to
        poll); its error, if any, is raised by the call that finds it done. A job that calls
        `slots_written()` is done for its caller from then on, while its tail (keeping copies of the
        rows) goes on. A job still running (its tail, or one whose caller gave up) is waited for before
        a new one starts, so two jobs never touch slots at once. `wait`: seconds this call may block
        for the job to be done before answering False (fewer polls, when no forward step is waiting)."""
        deadline = time.monotonic() + wait
        while True:
            if self._stage_once(key, work, background):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            job = self._reading.get(key)
            if job is not None and not job.answered:
                job.settled.wait(left)  # this load's job: until its slots are written or it ends
                continue
            for other in list(self._reading.values()):  # another job's tail: until it ends
                if other.is_alive():
                    other.join(left)
                    break
            else:
                return False

    def _stage_once(self, key: Hashable, work: Callable[[], Any], background: bool) -> bool:
        for old, job in list(self._reading.items()):
            if old == key and not job.answered and job.ready.is_set():
                job.answered = True
                self.last_job_seconds, self.last_job_cpus = job.seconds, job.cpus
                self.last_job_waited = job.waited
                return True
            if job.is_alive():
                if old != key:
                    self._asked.setdefault(key, time.perf_counter())
                return False
            del self._reading[old]
            self.last_tail_seconds = job.tail
            if old == key and not job.answered:
                job.result()
                self.last_job_seconds, self.last_job_cpus = job.seconds, job.cpus
                self.last_job_waited = job.waited
                return True
        asked = self._asked.pop(key, None)
        if not background:
            work()
            return True
        job = self._reading[key] = _Job(work)
        job.waited = 0.0 if asked is None else job.started - asked
        return False

    def wait_idle(self) -> None:
        """Wait for any job still running (a tail after its slots were written)."""
        for job in list(self._reading.values()):
            job.join()

    def keep(self, path: str, digest: str, entry: Entry, size: int) -> None:
        """Keep what a load made elsewhere (`pack_into_slots`' copies of the slot rows)."""
        with self._lock:
            self.misses += 1
            self._put(str(path), digest, entry, size)

    def unstage(self, path: str) -> None:
        """The load that staged `path` is over: keep it only as the budget allows."""
        with self._lock:
            self._staged.pop(str(path), None)

    def make_room(self, size: int) -> None:
        """Let go of the least recently used sets until `size` more bytes fit the budget, before a
        copy of that size is made for `keep`: their memory is then spare for it (`empty`)."""
        with self._lock:
            if int(size) <= self.budget:  # else the copy is not kept: nothing is let go for it
                self._shrink(self.budget - int(size))

    def empty(self, shape: tuple[int, ...], dtype) -> Any:
        """An uninitialised tensor for rows about to be kept: on the memory of an entry let go that
        nothing references any more (faulted in already) when one is large enough, else fresh."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            got = self._spare.take(nbytes)
        if got is None:
            self.fresh_bytes += nbytes
            return torch.empty(shape, dtype=dtype)
        self.reused_bytes += nbytes
        return got.view(dtype).view(shape)

    def _put(self, path: str, digest: str, entry: Entry, size: int) -> None:
        if size > self.budget:
            return
        self._sets[path] = (digest, entry, size)
        self._shrink()

    def _shrink(self, budget: int | None = None) -> None:
        budget = self.budget if budget is None else budget
        while self._sets and self.nbytes > budget:
            _, (_, entry, _) = self._sets.popitem(last=False)
            self._spare.give(entry)
        self._spare.trim(self.budget - self.nbytes)  # kept and spare memory within the budget

    def resize(self, budget: int) -> None:
        with self._lock:
            smaller, self.budget = int(budget) < self.budget, int(budget)
            self._shrink()
            if smaller:  # a smaller budget frees memory
                self._spare.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget": self.budget,
                "bytes": self.nbytes,
                "paths": list(self._sets),
                "hits": self.hits,
                "misses": self.misses,
                "last_job_seconds": self.last_job_seconds,
                "last_job_cpus": self.last_job_cpus,
                "last_job_waited": self.last_job_waited,
                "last_tail_seconds": self.last_tail_seconds,
                "spare_bytes": self._spare.nbytes,  # memory of entries let go, for the next copies
                "reused_bytes": self.reused_bytes,
                "fresh_bytes": self.fresh_bytes,
            }


class SpareMemory:
    """The memory of host-cache entries let go (evicted, or over the budget), kept for the next copy
    of slot rows into the host cache: in a vLLM CPU worker, first touching fresh memory is slow
    (144 MiB faulted in: 0.4 s there), and that copy runs after each never-seen load while the next
    load waits for it. A buffer is written again only once nothing else references it (the packed-set
    cache's writer, a load that staged the entry). Kept and spare memory together stay within the
    cache's budget (what the kept sets leave of it, oldest spare memory let go first): spare memory
    lives from `make_room` to the `keep` of the copy made on it."""

    def __init__(self) -> None:
        self._buffers: list[Any] = []  # flat uint8 tensors over the entries' storages

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers)

    def give(self, entry: Entry) -> None:
        import torch

        seen = {b.data_ptr() for b in self._buffers}
        for t in _tensors_of(entry):
            if t.device.type != "cpu" or t.is_pinned():
                continue
            flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
            if flat.numel() and flat.data_ptr() not in seen:
                seen.add(flat.data_ptr())
                self._buffers.append(flat)

    def trim(self, room: int) -> None:
        while self._buffers and self.nbytes > room:
            self._buffers.pop(0)

    def take(self, size: int) -> Any:
        """The smallest spare buffer of at least `size` bytes that nothing else references, cut to
        `size`; None when there is none."""
        fits = [b for b in self._buffers if b.numel() >= size and _alone(b)]
        if not fits or size <= 0:
            return None
        best = min(fits, key=lambda b: b.numel())
        self._buffers.remove(best)
        return best[:size]

    def clear(self) -> None:
        self._buffers.clear()


def _tensors_of(entry: Entry) -> list:
    """The tensors an entry holds: a worker's rows per layer (`LayerRows.parts()`)."""
    values = entry.values() if isinstance(entry, dict) else [entry]
    return [t for rows in values if hasattr(rows, "parts") for _, t in rows.parts()]


def _alone(flat) -> bool:
    """Whether `flat` is the only tensor on its memory (torch's count of the storage's users: this
    tensor and the storage object asked). False where torch cannot say: never written again."""
    import torch

    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: torch pinned by vLLM
    if use_count is None:
        return False
    return use_count(flat.untyped_storage()._cdata) <= 2


#: This process's cache (each vLLM worker process has its own).
HOST_CACHE = HostCache()


class ReadBuffer:
    """The buffer a load reads a set file into, kept from one load to the next (up to `limit`
    bytes; larger files get a fresh one). In a vLLM CPU worker, first touching fresh memory is slow
    (144 MiB faulted in: 0.4 s there against 0.014 s in a plain process on this machine), so a
    fresh buffer per load cost more than reading and packing the set. Loads run one at a time
    (`HostCache.stage`), and nothing made from a set keeps views on the buffer."""

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self._buf = None

    def __call__(self, size: int):
        import numpy as np

        if size > self.limit:
            return None
        if self._buf is None or self._buf.size < size:
            self._buf = None
            self._buf = np.empty(size, dtype=np.uint8)
        return self._buf[:size]


#: This process's read buffer.
READ_BUFFER = ReadBuffer()


def _anywhere() -> None:
    """Let the calling thread run on any CPU of the machine. A job is started from the worker's
    thread, which vLLM's CPU backend binds to the forward steps' cores (its OpenMP threads): a thread
    inherits that binding and would take turns with the steps on their cores instead of using the
    others (the CPUs vLLM reserves, the GPU machine's spare cores). OpenMP (libgomp) binds a thread
    to its place again at the thread's first parallel region (the CPU prepack's, the checks'), once:
    one empty region is run first, so the mask widened here stays wide (`cpus_allowed` shows it)."""
    _first_parallel_region()
    with contextlib.suppress(AttributeError, OSError):  # not on Linux; a cpuset that refuses
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


@functools.cache
def _libgomps() -> tuple:
    """The OpenMP runtimes (libgomp) this process loaded: torch's, and any other a library brought
    (scikit-learn's); each binds its own threads."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return ()
    libs = []
    for path in sorted(paths):
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL(path)
            lib.GOMP_parallel.argtypes = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            libs.append(lib)
    return tuple(libs)


def _empty_region(_data) -> None:
    pass


try:
    import ctypes as _ctypes

    _REGION = _ctypes.CFUNCTYPE(None, _ctypes.c_void_p)
    _EMPTY_REGION = _REGION(_empty_region)  # kept alive: libgomp calls it
except (ImportError, AttributeError):  # pragma: no cover - no ctypes
    _REGION = _EMPTY_REGION = None


def _first_parallel_region() -> None:
    """Run one OpenMP parallel region of one thread on the calling thread in every libgomp loaded
    (its own entry, `GOMP_parallel`), spending the binding each makes at a thread's first region
    (vLLM's CPU worker sets GOMP_CPU_AFFINITY to the forward steps' cores)."""
    for lib in _libgomps() if _EMPTY_REGION is not None else ():
        lib.GOMP_parallel(_EMPTY_REGION, None, 1, 0)


@contextlib.contextmanager
def _one_intraop_thread() -> Iterator[None]:
    """This thread's torch ops (the CPU prepack, finiteness checks) on one core while it runs: the job
    shares the machine with the forward steps' OpenMP thread team, and a second team started from
    this thread would have both spin-wait on each other's cores (a 144 MiB copy measured 0.07 s on
    one thread, 0.7-2.7 s on two, on a loaded 2-core machine). OpenMP's thread count is per calling
    thread, so the forward steps' own is left as it is. torch's C setter is called directly: vLLM's
    CPU worker replaces `torch.set_num_threads` with a no-op (it must not move its bound team)."""
    import torch

    before = torch._C.get_num_threads()
    torch._C.set_num_threads(1)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


@functools.cache
def load_helper() -> ThreadPoolExecutor:
    """The thread that takes part of a load job's packing while no request runs: on any CPU, one
    intra-op thread (as the job itself, `_Job.run`)."""

    def start() -> None:
        import torch

        _anywhere()
        torch._C.set_num_threads(1)

    return ThreadPoolExecutor(1, thread_name_prefix="expertlib-load-helper", initializer=start)


def slots_written() -> None:
    """Called by a load's work once the slots hold the set: in a background job, its caller is
    answered "done" from then on (the rest of the work must leave the slots alone)."""
    job = threading.current_thread()
    if isinstance(job, _Job):
        job.seconds = time.perf_counter() - job.started
        job.cpus = cpus_allowed()
        job.ready.set()
        job.settled.set()


def cpus_allowed() -> str:
    """The CPUs the calling thread may run on, as the kernel reports them for this very thread."""
    try:
        status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    except OSError:
        return ""
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list")
        ),
        "",
    )


class _Job(threading.Thread):
    """One load's work off the caller's thread."""

    def __init__(self, work: Callable[[], Any]):
        super().__init__(name="expertlib-load", daemon=True)
        self.work = work
        self._error: BaseException | None = None
        self.ready = threading.Event()  # set by slots_written()
        self.settled = threading.Event()  # set once ready or ended
        self.answered = False  # its caller was told it is done
        self.started, self.seconds = time.perf_counter(), 0.0
        self.waited = 0.0  # how long its load waited for the job before it to end
        self.tail = 0.0  # its time after its slots were written
        self.cpus = ""
        self.start()

    def run(self) -> None:
        _anywhere()
        try:
            with _one_intraop_thread():
                self.work()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        if not self.ready.is_set():
            self.seconds = time.perf_counter() - self.started
        self.tail = time.perf_counter() - self.started - self.seconds
        self.settled.set()

    def result(self) -> None:
        self.join()
        if self._error is not None:
            raise self._error
