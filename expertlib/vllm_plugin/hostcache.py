"""The second-level cache of expert sets on each worker: recently used sets' tensors in host memory.

Like vLLM's CPU LoRA cache, it holds the tensors of the sets most recently written into slots
(resident ones included), bounded in bytes, so that reloading a set that was evicted from the slots
is a copy from host memory instead of a file read. It holds verified bytes: a set enters as one
buffer read from its file once and checked (or covered by the front end's check of the unchanged
file, `expertlib.verify`). Keyed by the set file's path and content digest; one cache per worker
process.
"""

from __future__ import annotations

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
