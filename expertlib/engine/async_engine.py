"""`AsyncExpertEngine`: vLLM's `AsyncLLM` on one base model, the server's engine. Sets load and unload
while requests stream; a set with requests in flight is never evicted, and unloading it waits for them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from expertlib.bounds import DEFAULT_FACTOR
from expertlib.checkpoint import BaseCheckpoint
from expertlib.engine import requests
from expertlib.engine.book import SetBook, SetsView
from expertlib.engine.memory import memory_errors
from expertlib.engine.start import EngineStart
from expertlib.errors import NotLoadedError
from expertlib.loading import OpenedSet
from expertlib.patch import ExpertSet
from expertlib.sizing import DEFAULT_MAX_SETS, DEFAULT_SLOTS
from expertlib.slots import SetRef

log = logging.getLogger("expertlib.engine")


async def _prepack_poll() -> None:
    """How packing ahead waits between its pieces (and for the engine to be idle)."""
    await asyncio.sleep(0.01)


async def _load_poll() -> None:
    """How the async engine waits for the workers' background read of a set: requests run meanwhile."""
    await asyncio.sleep(0.005)


class AsyncExpertEngine(SetsView):
    """vLLM's `AsyncLLM` on one base model; sets load and unload while requests stream."""

    def __init__(
        self, engine, base: BaseCheckpoint, slots: int, max_sets: int, weight_bound: float = DEFAULT_FACTOR
    ):
        self.engine = engine
        self.base = base
        self._book = SetBook(base, slots, max_sets, weight_bound)
        self._lock = asyncio.Lock()
        self._drained: dict[str, asyncio.Event] = {}
        self._checked = False
        self.memory = ""  # what size_memory chose (one line)
        #: called with a set's name when a request names a set that is not resident (load on demand)
        self.on_missing: Any = None
        self._freed = asyncio.Event()  # set (and replaced) whenever a resident set may become evictable
        self._requests = 0  # requests streaming now, the base's included

    @classmethod
    def from_base(
        cls,
        base: str | Path,
        *,
        slots: int = DEFAULT_SLOTS,
        max_sets: int = DEFAULT_MAX_SETS,
        weight_bound: float = DEFAULT_FACTOR,
        **engine_kwargs: Any,
    ) -> AsyncExpertEngine:
        """Start vLLM's async engine on `base` with `slots` expert slots per MoE layer; sets beyond
        `weight_bound` x the base experts' max |w| are refused (`expertlib.bounds`)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_kwargs.setdefault("disable_log_stats", True)
        start = EngineStart.of(base, slots=slots, max_sets=max_sets, engine_kwargs=engine_kwargs)
        log.info("%s", start.memory)
        with memory_errors(start.memory):
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**start.vllm_kwargs))
        engine = cls(llm, start.base, slots, max_sets, weight_bound)
        engine.memory = start.memory
        engine._book.use(start)
        return engine

    async def _rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return await self.engine.collective_rpc(method, args=args)

    async def _check(self) -> None:
        if not self._checked:
            await self._book.start(self._rpc)
            self._checked = True

    async def load(
        self, es: OpenedSet | ExpertSet | str | Path, name: str | None = None, pin: bool = False
    ) -> str:
        """Load a set (a file, an ExpertSet, or an OpenedSet) while requests stream: the checks that
        read the file on a thread, then the placement and the workers' load under the lock."""
        opened = await asyncio.to_thread(self._book.open, es, name)
        async with self._lock:
            await self._check()
            return await self._book.load(opened, pin, self._rpc, _load_poll, lambda: self._requests == 0)

    def idle(self) -> bool:
        """No request streams and no set loads or unloads: packing ahead may take a piece."""
        return self._requests == 0 and not self._book.loading and not self._lock.locked()

    async def prepack(
        self, es: OpenedSet | ExpertSet | str | Path, name: str | None = None
    ) -> dict[str, Any]:
        """Pack a set into the workers' packed-set disk cache ahead of its first request, while the
        engine is idle (`idle`), so that its load is one read of packed rows into the slots. The set
        is checked as a load checks it first (a damaged file raises, nothing is written). Returns the
        workers' outcome (packed, cached, off: no packed-set cache, no room: not in its free space,
        nothing is evicted for it, or "failed: why") and the bytes written."""
        opened = await asyncio.to_thread(self._book.open, es, name)
        if not self._checked:
            async with self._lock:
                await self._check()
        return await self._book.prepack(opened, self._rpc, self.idle, _prepack_poll)

    def _slots_freed(self) -> None:
        event, self._freed = self._freed, asyncio.Event()
        event.set()

    async def wait_for_slots(self, timeout: float) -> bool:
        """Wait until a resident set may have become evictable (a set's last request finished, a
        set was unpinned or unloaded); False when `timeout` seconds passed first. For a load that
        found every resident set pinned or busy (SlotsBusyError): retry it after this."""
        try:
            await asyncio.wait_for(self._freed.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        return True

    async def unload(self, name: str) -> None:
        """Unload a set; new requests for it are refused at once, requests in flight finish first."""
        self._book.pool.row_of(name)
        self._book.unloading.add(name)
        try:
            while self._book.in_flight.get(name, 0) > 0:
                event = self._drained.setdefault(name, asyncio.Event())
                await event.wait()
            async with self._lock:
                await self._book.unload(name, self._rpc)
        finally:
            self._book.unloading.discard(name)
            self._slots_freed()

    def pin(self, name: str, pinned: bool = True) -> None:
        self._book.pin(name, pinned)
        if not pinned:
            self._slots_freed()

    async def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, expert_set: SetRef | str | None = None
    ) -> AsyncIterator[Any]:
        """Stream RequestOutputs for one request served by `expert_set` (a SetRef, a name; None = the base).

        A set evicted since the caller resolved it is reloaded through `on_missing` when set."""
        for attempt in range(3):
            try:
                ref = self._book.ref(expert_set)  # raises NotLoadedError before anything is queued
                break
            except NotLoadedError:
                name = expert_set if isinstance(expert_set, str) else expert_set.name
                if name in self._book.loading and attempt < 2:
                    async with self._lock:  # its load runs under the lock: done once we hold it
                        continue
                if self.on_missing is None or name in self._book.unloading or attempt == 2:
                    raise
                await self.on_missing(name)
        prompt = requests.salted(prompt, ref)
        name = ref.name if ref else None
        self._book.request_started(name)  # no await since ref(): the set cannot be evicted in between
        self._requests += 1
        try:
            async for out in self.engine.generate(
                prompt, requests.with_set_row(sampling_params, ref), request_id
            ):
                yield out
        finally:
            self._requests -= 1
            self._book.request_finished(name)
            if name and not self._book.in_flight.get(name):
                event = self._drained.pop(name, None)
                if event is not None:
                    event.set()
                self._slots_freed()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def routing_of(self, prompt_ids: list[int]) -> dict[int, list[float]]:
        """The prompt's routing under the base: MoE layer -> top-k picks per routed expert, counted
        in the workers during one base prefill (a max_tokens=1 request with a capture row and a salt
        of its own, so no cached prefix hides tokens). What `model="auto"` matches profiles against."""
        import uuid

        from vllm import SamplingParams

        from expertlib.vllm_plugin import CAPTURE_KEY, CAPTURE_ROWS

        if getattr(self, "_capture_rows", None) is None:
            self._capture_rows: asyncio.Queue[int] = asyncio.Queue()
            for row in range(1, CAPTURE_ROWS + 1):
                self._capture_rows.put_nowait(row)
        row = await self._capture_rows.get()
        tag = uuid.uuid4().hex
        self._requests += 1  # a request like any other: packing ahead and load polls make way for it
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_KEY: row})
            prompt = {"prompt_token_ids": list(prompt_ids), "cache_salt": f"expertlib-route-{tag}"}
            async for _ in self.engine.generate(prompt, requests.with_set_row(params, None), f"route-{tag}"):
                pass
        finally:
            self._requests -= 1
            try:  # read and zeroed even when the request failed: the row goes back clean
                counts = (await self._rpc("expertlib_take_routing", (row,)))[0]
            finally:
                self._capture_rows.put_nowait(row)
        return {int(layer): v for layer, v in counts.items()}

    def verify_params(self, sampling_params: Any) -> None:
        """Raise the validation error vLLM would raise when the request is added (e.g. a JSON
        schema its structured-output backend cannot compile), before anything is streamed."""
        ip = self.engine.input_processor
        sampling_params.clone().verify(
            ip.model_config, ip.speculative_config, ip.structured_outputs_config, ip.tokenizer
        )

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def shutdown(self) -> None:
        self.engine.shutdown()


__all__ = ["AsyncExpertEngine"]
