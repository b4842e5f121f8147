"""The second-level cache of expert sets on each worker: recently used sets' tensors in host memory.

Like vLLM's CPU LoRA cache, it holds the tensors of the sets most recently written into slots
(resident ones included), bounded in bytes, so that reloading a set that was evicted from the slots
is a copy from host memory instead of a file read. It holds verified bytes: a set enters as one
buffer read from its file once and checked (or covered by the front end's check of the unchanged
file, `expertlib.verify`). Keyed by the set file's path and content digest; one cache per worker
process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from expertlib.patch import ExpertSet
from expertlib.verify import VerifiedRecord


class HostCache:
    def __init__(self, budget: int = 0):
        self.budget = int(budget)
        self._sets: OrderedDict[str, ExpertSet] = OrderedDict()  # LRU order: oldest first
        self._bytes: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self._staged: dict[str, ExpertSet] = {}  # read for a load in progress, whatever the budget
        self._reading: dict[str, _Read] = {}  # background reads (`stage`)

    @property
    def nbytes(self) -> int:
        return sum(self._bytes.values())

    def open(
        self, path: str, content_digest: str | None = None, checked: VerifiedRecord | None = None
    ) -> tuple[ExpertSet, bool]:
        """The set at `path` with its verified tensors in memory, and whether it came from the cache.

        `checked`: a full check of the file made elsewhere (the engine's front end), trusted while the
        file is unchanged since; otherwise the bytes read are checked here."""
        path = str(path)
        staged = self._staged.get(path)
        if staged is not None and content_digest in (None, staged.manifest.content_digest):
            return staged, False
        cached = self._sets.get(path)
        if cached is not None and content_digest in (None, cached.manifest.content_digest):
            self._sets.move_to_end(path)
            self.hits += 1
            return cached, True
        if cached is not None:  # the file now holds another set
            self._sets.pop(path)
            self._bytes.pop(path, None)
        es = ExpertSet.open(path)
        if checked is not None:
            es.trust(checked)
        es.read_verified()  # each byte read once, into the buffer the slots are filled from
        self.misses += 1
        self._put(path, es)
        return es, False

    def stage(
        self,
        path: str,
        content_digest: str | None = None,
        checked: VerifiedRecord | None = None,
        background: bool = False,
    ) -> bool:
        """Have the set at `path` in memory, read and checked, for the slot writes of a load; True
        once it is. `background`: the read runs on a thread of its own (file reads, hashing and
        numpy release the GIL, so forward steps go on) and this returns False until it is done
        (call again to poll); its error, if any, is raised by the call that finds it done."""
        path = str(path)
        job = self._reading.get(path)
        if job is None:
            if _holds(self._staged.get(path), content_digest):
                return True
            if not background or _holds(self._sets.get(path), content_digest):  # a hit is no wait
                self._staged[path] = self.open(path, content_digest, checked)[0]
                return True
            self._reading[path] = _Read(path, checked)
            return False
        if job.is_alive():
            return False
        del self._reading[path]
        es = job.result()
        if content_digest is not None and es.manifest.content_digest != content_digest:
            from expertlib.errors import DigestMismatchError

            raise DigestMismatchError("the set file changed after it was checked", path=path)
        self.misses += 1
        self._put(path, es)
        self._staged[path] = es
        return True

    def unstage(self, path: str) -> None:
        """The load that staged `path` is over: keep it only as the budget allows."""
        self._staged.pop(str(path), None)

    def _put(self, path: str, es: ExpertSet) -> None:
        size = sum(t.numel() * t.element_size() for t in es.tensors.values())
        if size > self.budget:
            return
        self._sets[path] = es
        self._bytes[path] = size
        self._shrink()

    def _shrink(self) -> None:
        while self._sets and self.nbytes > self.budget:
            old, _ = self._sets.popitem(last=False)
            self._bytes.pop(old, None)

    def resize(self, budget: int) -> None:
        self.budget = int(budget)
        self._shrink()

    def status(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "bytes": self.nbytes,
            "paths": list(self._sets),
            "hits": self.hits,
            "misses": self.misses,
        }


#: This process's cache (each vLLM worker process has its own).
HOST_CACHE = HostCache()


def _holds(es: ExpertSet | None, content_digest: str | None) -> bool:
    return es is not None and content_digest in (None, es.manifest.content_digest)


class _Read(threading.Thread):
    """One set file read into host memory and checked (`ExpertSet.read_verified`) off the caller's thread."""

    def __init__(self, path: str, checked: VerifiedRecord | None):
        super().__init__(name="expertlib-stage", daemon=True)
        self.path, self.checked = path, checked
        self._es: ExpertSet | None = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            es = ExpertSet.open(self.path)
            if self.checked is not None:
                es.trust(self.checked)
            self._es = es.read_verified()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> ExpertSet:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._es is not None
        return self._es
