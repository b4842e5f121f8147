"""Packing the registry's sets ahead of their first request (`expertlib serve --prepack`, on by default).

A set never loaded on this machine loads in three steps on the workers: its file read and checked,
every expert prepacked into the CPU kernel's layout, the rows copied into slots. The packed-set disk
cache (`expertlib.vllm_plugin.packcache`) skips the first two for a set packed before. While no
request runs, `Prepacker` has the engine pack the registry's sets of this base into that cache
(`AsyncExpertEngine.prepack`: checked as a load checks them, a piece at a time on the workers'
threads, only while the engine is idle, into the cache's free space), so a later request takes the
cache's path. Newest versions first; sets resident or packed already are left alone; the registry is
listed again every `relist_s` seconds (and at once after `wake`: a push through the server's admin
registry route), so a set published while the server runs is packed shortly after. A set that fails its check is logged and skipped, never packed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from expertlib.errors import ExpertlibError

log = logging.getLogger("expertlib.server")

#: Seconds between two listings of the registry.
RELIST_S = 10.0
#: Outcomes a set is tried again after, on the next round
AGAIN = ("no room", "packing elsewhere")


class Prepacker:
    def __init__(self, engine: Any, catalog: Any, *, relist_s: float = RELIST_S):
        self.engine, self.catalog = engine, catalog
        self.relist_s = relist_s
        self.outcomes: dict[str, str] = {}  # blob digest -> outcome (packed, cached, failed: why)
        self.packed = 0  # sets packed ahead
        self.bytes = 0
        self.failed = 0
        self.pending: list[str] = []  # registered sets not packed yet, in the order they are taken
        self.current: str | None = None
        self.off = ""  # why it does nothing (the workers' packed-set cache is off), else ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="expertlib-prepack")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wake(self) -> None:
        """List the registry again now (a set was published through this server)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception as exc:  # noqa: BLE001 - packing ahead never stops the server
                log.warning("packing sets ahead failed this round: %s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.relist_s)

    async def round(self) -> None:
        """List the registry and pack every set of this base not packed yet, resident or tried."""
        self._wake.clear()
        refs = await asyncio.to_thread(self.catalog.registered)
        refs.sort(key=lambda r: -r.version)  # newest versions first (stable: the registry's order)
        loaded = set(self.catalog.loaded())
        # a set that found no room is tried again (room may have been made since), and one another
        # process was packing (a replica sharing the cache: cached by now, or given up)
        todo = [r for r in refs if self.outcomes.get(r.digest, "no room") in AGAIN and str(r) not in loaded]
        self.pending = [str(r) for r in todo]
        for ref in todo:
            while not self.engine.idle():
                await asyncio.sleep(0.05)
            self.current = str(ref)
            try:
                outcome = await self._pack(ref)
            finally:
                self.current = None
                self.pending.remove(str(ref))
            if outcome == "off":  # the workers' packed-set cache is off: tried again next round
                self.off = "the packed-set disk cache is off"
                self.pending = []
                return
            self.off = ""
            self.outcomes[ref.digest] = outcome

    async def _pack(self, ref: Any) -> str:
        try:
            opened = await asyncio.to_thread(self.catalog.open_set, ref)
            result = await self.engine.prepack(opened)
        except ExpertlibError as exc:  # a damaged or refused set: skipped, never packed
            log.warning("expert set %s not packed ahead: %s", ref, exc.message)
            self.failed += 1
            return f"failed: {exc.message}"
        outcome = str(result.get("outcome", ""))
        if outcome == "packed":
            self.packed += 1
            self.bytes += int(result.get("bytes", 0))
            log.info("expert set %s packed ahead (%.1f MiB)", ref, result.get("bytes", 0) / 2**20)
        elif outcome.startswith("failed"):
            log.warning("expert set %s not packed ahead: %s", ref, outcome)
            self.failed += 1
        return outcome

    def status(self) -> dict[str, Any]:
        return {
            "enabled": not self.off,
            "off": self.off,
            "packed": self.packed,
            "bytes": self.bytes,
            "failed": self.failed,
            "pending": len(self.pending),
            "current": self.current,
        }


__all__ = ["Prepacker", "RELIST_S"]
