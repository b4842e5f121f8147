"""`ExpertEngine`: vLLM's offline `LLM` on one base model, with expert sets loaded into its slots."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from expertlib.bounds import DEFAULT_FACTOR
from expertlib.engine import requests
from expertlib.engine.book import SetBook, SetsView
from expertlib.engine.memory import memory_errors
from expertlib.engine.start import EngineStart
from expertlib.loading import OpenedSet
from expertlib.patch import ExpertSet
from expertlib.sizing import DEFAULT_MAX_SETS, DEFAULT_SLOTS
from expertlib.slots import SetRef

T = TypeVar("T")


class ExpertEngine(SetsView):
    """vLLM's offline `LLM` on one base model, with expert sets loaded into its slots. A set whose
    weights exceed `weight_bound` x the base experts' max |w| is refused (`expertlib.bounds`)."""

    def __init__(
        self,
        base: str | Path,
        *,
        slots: int = DEFAULT_SLOTS,
        max_sets: int = DEFAULT_MAX_SETS,
        weight_bound: float = DEFAULT_FACTOR,
        **engine_kwargs: Any,
    ):
        from vllm import LLM

        start = EngineStart.of(base, slots=slots, max_sets=max_sets, engine_kwargs=engine_kwargs)
        self.base, self.memory = start.base, start.memory
        self._book = SetBook(self.base, slots, max_sets, weight_bound)
        with memory_errors(self.memory):
            self.llm = LLM(**start.vllm_kwargs)
        self._book.use(start)
        _run_now(self._book.start(self._rpc))

    async def _rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return self.llm.collective_rpc(method, args=args)  # synchronous: never suspends

    def load(self, es: OpenedSet | ExpertSet | str | Path, name: str | None = None, pin: bool = False) -> str:
        """Load a set (a file, an ExpertSet, or an OpenedSet) into free slots, evicting least recently
        used unpinned sets; returns its name. The checks are `expertlib.loading.SetLedger`'s."""
        opened = self._book.open(es, name)
        return _run_now(self._book.load(opened, pin, self._rpc))

    def unload(self, name: str) -> None:
        _run_now(self._book.unload(name, self._rpc))

    def pin(self, name: str, pinned: bool = True) -> None:
        self._book.pin(name, pinned)

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def generate(
        self,
        prompts: str | Sequence[Any],
        expert_set: SetRef | str | None | Sequence[SetRef | str | None] = None,
        sampling_params: Any = None,
        *,
        use_tqdm: bool = False,
    ) -> list[Any]:
        """Generate for each prompt with its expert set (one for all, or one per prompt; a name or a
        SetRef; None = base)."""
        single = isinstance(prompts, (str, dict))
        prompt_list = [prompts] if single else list(prompts)
        n = len(prompt_list)
        one = expert_set is None or isinstance(expert_set, (str, SetRef))
        sets = [expert_set] * n if one else list(expert_set)
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * n
        if len(sets) != n or len(params) != n:
            raise ValueError(f"{n} prompts, {len(sets)} expert sets and {len(params)} sampling params")
        refs = [self._book.ref(s) for s in sets]
        per_request = [requests.with_set_row(p, r) for p, r in zip(params, refs, strict=True)]
        salted = [requests.salted(p, r) for p, r in zip(prompt_list, refs, strict=True)]
        return self.llm.generate(salted, per_request, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        """Stop the engine core and its worker processes (tensor-parallel workers included)."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> ExpertEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its awaits are synchronous calls) to its end, without an
    event loop: how the offline engine runs the transactions it shares with the async engine."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("expertlib: a synchronous engine transaction suspended")


__all__ = ["ExpertEngine"]
