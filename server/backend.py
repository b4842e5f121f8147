"""What the server needs from a serving engine: the protocol `expertlib.engine.AsyncExpertEngine`
implements. The HTTP layer is written against this and nothing else.

Optional: `verify_params(sampling_params)` raising vLLM's validation error for parameters the
engine would refuse when the request is added (e.g. a JSON schema its structured-output backend
cannot compile); the server calls it, when present, before a response starts."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from expertlib.slots import SetRef


@runtime_checkable
class ServingEngine(Protocol):
    async def load(self, es: Any, name: str | None = None, pin: bool = False) -> str:
        """Put a set into free slots; return the name it is served under. The catalog passes an
        `expertlib.loading.OpenedSet` (the set, its served name and registry version); an ExpertSet or
        a patch path works too."""

    async def unload(self, name: str) -> None: ...

    def pin(self, name: str, pinned: bool = True) -> Any:
        """May be sync or async (the server awaits the result when it is awaitable)."""

    def status(self) -> dict[str, Any]:
        """Slots used and free, loaded sets and pins (JSON-serialisable)."""

    def loaded_sets(self) -> list[str]: ...

    def ref(self, name: str) -> SetRef:
        """The SetRef of a loaded set (served name, content digest, set row); NotLoadedError otherwise."""

    def generate(
        self, prompt: str | list[int], sampling_params: Any, request_id: str, expert_set: SetRef | None
    ) -> AsyncIterator[Any]:
        """vLLM RequestOutputs (cumulative) for one prompt, salted for prefix caching with
        `expert_set.cache_salt`; a set no longer resident -> NotLoadedError."""

    async def abort(self, request_id: str) -> None: ...

    def get_tokenizer(self) -> Any:
        """The HF tokenizer (sync, or awaitable)."""

    def shutdown(self) -> None: ...


PatchPath = str | Path


async def maybe_await(value: Any) -> Any:
    """`await value` if it is awaitable: engine methods may be sync or async."""
    return await value if inspect.isawaitable(value) else value
