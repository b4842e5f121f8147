"""The second-level cache of expert sets on each worker: recently used sets' tensors in host memory.

Like vLLM's CPU LoRA cache, it holds the tensors of the sets most recently written into slots
(resident ones included), bounded in bytes, so that reloading a set that was evicted from the slots
is a copy from host memory instead of a file read. Keyed by the set file's path (registry blobs are
content-addressed, so a path names one immutable set); one cache per worker process.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from expertlib.patch import ExpertSet


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

    def open(self, path: str) -> tuple[ExpertSet, bool]:
        """The set at `path` with its tensors in memory, and whether it came from the cache."""
        path = str(path)
        if path in self._sets:
            self._sets.move_to_end(path)
            self.hits += 1
            return self._sets[path], True
        es = ExpertSet.open(path)
        es.tensors  # noqa: B018 - read the file once, here
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
