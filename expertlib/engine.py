"""Serving engines: one base MoE model in vLLM, many expert sets loaded into its expert slots.

    engine = ExpertEngine("path/to/base", slots=8, max_sets=8, enforce_eager=True)
    engine.load("math.safetensors")                     # -> "math" (the set's task name)
    engine.load(code_set, name="code", pin=True)        # an in-memory ExpertSet works too
    outs = engine.generate(["2+2=", "def f(", "hi"], expert_set=["math", "code", None])
    engine.unload("math")

`AsyncExpertEngine.from_base(...)` is the same over vLLM's AsyncLLM (for the server): `await load`,
`await unload`, and `generate(prompt, sampling_params, request_id, expert_set=...)` streams
RequestOutputs. Loads and unloads run on the workers through `collective_rpc` while requests are being
served; a set with requests in flight is never evicted, and unloading it waits for them.

A request's set is a `SetRef` (name, content digest, set row, registry version): `engine.ref(name)`
resolves a name once (the server's catalog does it per request) and `generate` takes the value; a
plain name is resolved the same way. Both engines run one load/unload transaction (`_SetBook.load`,
`_SetBook.unload`), written once against an awaitable `rpc`.

The slot accounting is `expertlib.slots.SlotPool`; the vLLM mechanics are `expertlib.vllm_plugin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from expertlib.apply import check_against_base
from expertlib.bounds import DEFAULT_FACTOR, WeightBounds, check_bounds, merge_absmax, set_absmax
from expertlib.checkpoint import BaseCheckpoint
from expertlib.errors import (
    EngineError,
    MemoryBudgetError,
    ModelLoadError,
    NotLoadedError,
    PatchShapeError,
    SlotError,
)
from expertlib.patch import ExpertSet
from expertlib.sizing import DEFAULT_MAX_SETS, DEFAULT_SLOTS
from expertlib.slots import Placement, SetRef, SlotPool
from expertlib.vllm_plugin import SET_ROW_KEY, WORKER_EXTENSION, slot_hf_overrides

log = logging.getLogger("expertlib.engine")

#: collective_rpc as both engines call it: (method, args) -> one result per worker, awaitable
Rpc = Callable[[str, tuple], Awaitable[list[Any]]]
T = TypeVar("T")


# --- the base checkpoint ------------------------------------------------------------------------------


def resolve_base(base: str | Path) -> Path:
    """A local folder holding the base model (a hub id resolves through the local HF cache only)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base), local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several error types
        raise ModelLoadError(
            f"base model {str(base)!r} is neither a folder nor in the local Hugging Face cache",
            hint="pass the folder of a saved model (config.json + safetensors)",
        ) from exc


# --- accounting shared by both engines -----------------------------------------------------------------


class _SetBook:
    """The engine's ledger of expert sets, shared by the sync and async engines: which sets are loaded
    in which slots and remap rows (a SlotPool), the file each came from, pins, and requests in flight
    (a set serving requests is never evicted)."""

    def __init__(self, base: BaseCheckpoint, slots: int, max_sets: int, weight_bound: float = DEFAULT_FACTOR):
        self.base = base
        #: the weight bound (expertlib.bounds); its base statistics come from the workers at start()
        self.bounds = WeightBounds({}, weight_bound)
        self.pool = SlotPool(base.moe_layers, base.num_experts, slots, max_sets)
        self.sets: dict[str, ExpertSet] = {}
        self.user_pins: set[str] = set()
        self.in_flight: Counter[str] = Counter()
        self.unloading: set[str] = set()
        self.history: dict[str, dict[str, float]] = {}  # per set: loads, cache_loads, evictions, load_seconds
        self.paths: dict[str, str] = {}  # every set ever loaded -> its file (names the host cache's entries)
        self.host_cache: dict[str, Any] = {}  # the workers' host cache, as last reported
        self.verify_always = False  # hash every load in full (--verify-loads always), not once per file
        self.loading: set[str] = set()  # placed, slots being written: requests wait for the load
        self._tmp = tempfile.TemporaryDirectory(prefix="expertlib-engine-")

    def open(self, es: ExpertSet | str | Path, name: str | None) -> tuple[ExpertSet, str, str]:
        """The set, its name and a file the workers can read; refuses sets for another base."""
        if not isinstance(es, ExpertSet):
            es = ExpertSet.open(es)
        m = es.manifest
        name = name or m.task
        if m.extra_params:
            raise PatchShapeError(
                f"expert set {name!r} carries full parameters {sorted(m.extra_params)[:3]}; slots hold routed experts only",
                hint="apply such a set in place (expertlib.apply) or serve a merged checkpoint",
            )
        self.check_base(es)
        es.verify(always=self.verify_always)  # digests recomputed, NaN/inf refused: before any eviction
        if es.path is None:
            es.save(Path(self._tmp.name) / f"{abs(hash((name, m.content_digest)))}.safetensors")
        return es, name, str(es.path)

    def check_base(self, es: ExpertSet) -> None:
        check_against_base(
            es,
            identity=self.base.identity,
            moe_layers=self.base.moe_layers,
            num_experts=self.base.num_experts,
            expert_digest=self.base.expert_digest,
            hint="serve the exact base checkpoint the set was trained on",
            expert_shapes=self.base.expert_shapes,
        )

    def place(self, es: ExpertSet, name: str, pin: bool) -> Placement | None:
        """Reserve slots; None when this very set is already loaded (then only touch/pin)."""
        if name in self.unloading:
            raise SlotError(f"expert set {name!r} is being unloaded", hint="retry once the unload finished")
        if name in self.pool:
            if self.sets[name].manifest.content_digest != es.manifest.content_digest:
                raise SlotError(
                    f"another expert set named {name!r} is loaded",
                    hint="unload it first, or load this one under another name",
                )
            self.pool.touch(name)
            if pin:
                self.pin(name, True)
            return None
        m = es.manifest
        # slots are shared only on digests recomputed from the tensors, never on the manifest's claims
        placement = self.pool.place(name, m.experts, es.verify(), pinned=pin)
        for gone in placement.evicted:
            self.count(gone, "evictions")
            log.info("evicted expert set %s (least recently used) to load %s", gone, name)
            self.forget(gone)
        self.sets[name] = es
        if pin:
            self.user_pins.add(name)
        return placement

    def forget(self, name: str) -> None:
        self.sets.pop(name, None)
        self.user_pins.discard(name)

    def count(self, name: str, what: str, by: float = 1) -> None:
        h = self.history.setdefault(name, dict(loads=0, cache_loads=0, evictions=0, load_seconds=0.0))
        h[what] += by

    def loaded_from(self, name: str, path: str, seconds: float, cache: dict[str, Any] | None) -> None:
        """Book a finished load: its time, and whether the workers took it from their host cache."""
        hits = (cache or {}).get("hits", 0) - self.host_cache.get("hits", 0)
        self.paths[name] = path
        self.count(name, "loads")
        self.count(name, "load_seconds", seconds)
        if cache is not None:
            self.count(name, "cache_loads", 1 if hits > 0 else 0)
            self.host_cache = cache

    def residency(self, name: str) -> str:
        """Where a set is: "slots" (resident), "host" (host cache of the workers) or "disk"."""
        if name in self.pool:
            return "slots"
        if self.paths.get(name) in set(self.host_cache.get("paths", [])):
            return "host"
        return "disk"

    def stage_args(self, name: str, path: str) -> tuple[str, str, str | None]:
        es = self.sets[name]
        digest = es.manifest.content_digest  # the worker checks its copy against it
        checked = es.checked.model_dump_json() if es.checked is not None else None  # it trusts this check
        return (path, digest, checked)

    def ref(self, expert_set: SetRef | str | None) -> SetRef | None:
        """The SetRef a request runs with (None or "" = the base), and the set marked recently used.

        A name is resolved here, the one place; a SetRef resolved earlier is checked (still resident,
        the same tensors) and follows its set to a new row if it was evicted and loaded again."""
        if not expert_set:
            return None
        name = expert_set if isinstance(expert_set, str) else expert_set.name
        if name in self.loading:
            raise NotLoadedError(f"expert set {name!r} is being loaded", hint="retry once the load finished")
        if name in self.unloading:
            raise NotLoadedError(f"expert set {name!r} is being unloaded", hint="load it again to use it")
        set_row = self.pool.row_of(name)  # NotLoadedError when it is not resident
        digest = self.sets[name].manifest.content_digest
        self.pool.touch(name)
        if isinstance(expert_set, str):
            return SetRef(name, digest, set_row)
        if expert_set.digest != digest:
            raise NotLoadedError(
                f"expert set {name!r} was replaced by another set of that name after the request named it",
                hint="send the request again",
            )
        return expert_set if expert_set.set_row == set_row else replace(expert_set, set_row=set_row)

    # --- the transactions both engines run (rpc: the engine's collective_rpc, awaitable) ------------

    async def start(self, rpc: Rpc, host_cache_budget: int | None) -> None:
        """Check the workers' slot layout against this book and size their host cache (None: as is)."""
        infos = await rpc("expertlib_info", ())
        _check_worker(infos[0], self.base, self.pool.slots_per_layer, self.pool.max_sets)
        shards = [{(int(layer), str(part)): v for layer, part, v in i["weight_absmax"]} for i in infos]
        # the largest over tensor-parallel shards
        self.bounds = WeightBounds(merge_absmax(shards), self.bounds.factor)
        self.host_cache = (await rpc("expertlib_host_cache", (host_cache_budget,)))[0]

    async def load(self, es: ExpertSet, name: str, path: str, pin: bool, rpc: Rpc, pause=None) -> str:
        """Reserve slots and a set row (evicting least recently used unpinned sets), have the workers
        copy the set in (`_write`) and write its row last, book the load. If the workers fail, the
        reservation is undone and the row cleared on them, so book and workers agree. `pause`: an
        awaitable that lets requests run while the workers read the set (the async engine). A set whose
        weights exceed the weight bound is refused first, before anything is evicted."""
        check_bounds(set_absmax(es), self.bounds, name=name)
        evicted_rows = {n: self.pool.row_of(n) for n in self.pool.loaded()}
        placement = self.place(es, name, pin)
        if placement is None:  # already resident: touched (and pinned)
            return name
        start = time.perf_counter()
        self.loading.add(name)
        try:
            await self._write(placement, [evicted_rows[n] for n in placement.evicted], path, rpc, pause)
        except Exception:
            if name in self.pool:
                self.pool.release(name)
            self.forget(name)
            with contextlib.suppress(Exception):  # the engine is failing already; the row stays unused
                await rpc("expertlib_apply", ([placement.set_row],))
            raise
        finally:
            self.loading.discard(name)
            cache = None  # the workers' host cache after the load, as unstaging reports it
            with contextlib.suppress(Exception):
                cache = (await rpc("expertlib_unstage", (path,)))[0]
        self.loaded_from(name, path, time.perf_counter() - start, cache)
        return name

    async def _write(self, placement: Placement, evicted_rows: list[int], path: str, rpc: Rpc, pause) -> None:
        """The workers' side of a load: clear the evicted sets' rows (before their slots are
        overwritten), have the workers read, check and pack the set (or take it from their host
        cache) and copy it into its slots, on a worker thread while steps run when `pause` is given
        (no step is held up by more than a poll), and only then write the set's row, so that no step
        sees it half written."""
        args = self.stage_args(placement.name, path)
        if evicted_rows:
            await rpc("expertlib_apply", (evicted_rows,))
        fills = [[layer, slot, e] for layer, slot, e in placement.fills]
        while not all(await rpc("expertlib_stage", (*args, pause is not None, fills))):
            await pause()
        remap = {layer: dict(m) for layer, m in placement.remap.items()}  # expert -> slot
        await rpc("expertlib_apply", ([], None, None, placement.set_row, remap))

    async def unload(self, name: str, rpc: Rpc) -> None:
        """Free a set's slots and row, and clear the row on the workers."""
        set_row = self.pool.row_of(name)
        self.pool.release(name)
        self.forget(name)
        await rpc("expertlib_apply", ([set_row],))

    def pin(self, name: str, pinned: bool = True) -> None:
        self.pool.row_of(name)
        (self.user_pins.add if pinned else self.user_pins.discard)(name)
        self.pool.pin(name, pinned or self.in_flight[name] > 0)

    def acquire(self, name: str | None) -> None:
        if name:
            self.in_flight[name] += 1
            self.pool.pin(name, True)  # never evicted while a request uses it

    def release(self, name: str | None) -> None:
        if name:
            self.in_flight[name] -= 1
            if self.in_flight[name] <= 0:
                del self.in_flight[name]
                if name in self.pool:
                    self.pool.pin(name, name in self.user_pins)

    def status(self) -> dict[str, Any]:
        st = self.pool.status()
        for name, info in st["sets"].items():
            m = self.sets[name].manifest
            info.update(
                pinned=name in self.user_pins,
                in_flight=self.in_flight.get(name, 0),
                task=m.task,
                content_digest=m.content_digest,
                path=str(self.sets[name].path) if self.sets[name].path else None,
            )
        st["history"] = {n: dict(h, residency=self.residency(n)) for n, h in self.history.items()}
        st["host_cache"] = {k: v for k, v in self.host_cache.items() if k != "paths"}
        st["base"] = self.base.identity.model_dump()
        st["base_path"] = str(self.base.path)
        st["num_experts"] = self.base.num_experts
        st["moe_layers"] = list(self.base.moe_layers)
        return st


def _engine_kwargs(base: BaseCheckpoint, slots: int, max_sets: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    if slots < 1 or max_sets < 1:
        raise SlotError("slots and max_sets must be >= 1")
    kw = dict(kwargs)
    overrides = dict(kw.pop("hf_overrides", None) or {})
    overrides.update(slot_hf_overrides(base.config.model_type, slots=slots, max_sets=max_sets))
    if kw.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise EngineError("worker_extension_cls is set by ExpertEngine", hint="do not pass it")
    kw.update(model=str(base.path), hf_overrides=overrides, worker_extension_cls=WORKER_EXTENSION)
    _refuse_unsupported_layouts(kw)
    if not _on_cpu():  # only Triton keeps checkpoint layout and calls the slot router (docs/GPU.md)
        kw.setdefault("moe_backend", "triton")
        from expertlib.vllm_plugin.moe_configs import use_tuned_configs

        text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        use_tuned_configs(
            base.num_experts,
            slots,
            int(inter),
            tensor_parallel_size=int(kw.get("tensor_parallel_size") or 1),
            dtype=kw.get("dtype"),
        )
    return kw


def _refuse_unsupported_layouts(kw: dict[str, Any]) -> None:
    """Pipeline stages hold only their own layers (the workers' slot layouts would disagree), and vLLM's
    routing simulator picks experts itself (tokens would land in empty slots): refuse both up front."""
    if int(kw.get("pipeline_parallel_size") or 1) > 1:
        raise EngineError(
            "expert slots do not support pipeline parallelism (each stage holds only its own MoE layers)",
            hint="serve with --engine-arg tensor_parallel_size=N instead of pipeline_parallel_size",
        )
    if os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY"):
        raise EngineError(
            "VLLM_MOE_ROUTING_SIMULATION_STRATEGY is set: vLLM's routing simulator would send tokens to "
            "random experts, empty slots included",
            hint="unset VLLM_MOE_ROUTING_SIMULATION_STRATEGY to serve expert sets",
        )


#: Sequences the CPU KV cache is sized for when max_num_seqs is not given (vLLM's server default on CPU).
CPU_MAX_NUM_SEQS = 128


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def size_memory(base: BaseCheckpoint, slots: int, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Engine kwargs with memory settings that fit this machine, and one line saying what was chosen.

    CPU: the KV cache is sized from the model, max_model_len and max_num_seqs (`expertlib.sizing`)
    and passed as vLLM's `kv_cache_memory_bytes`, which the CPU worker honours, instead of vLLM's
    default of 0.92 of the NUMA node; a context too long for the memory is shortened when the caller
    gave none. `VLLM_CPU_KVCACHE_SPACE` in the environment still wins (vLLM reads it). GPU: vLLM's
    gpu_memory_utilization stays; the weights plus the slots must leave room for a KV cache in it."""
    from expertlib import sizing

    kw = dict(kwargs)
    dims = sizing.ModelDims.of(base, kw.get("dtype"))
    slot_bytes = slots * dims.slot_row_bytes
    if not _on_cpu():
        tp, pp = int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1)
        devices = sizing.gpu_memory(tp * pp)  # NVML: no CUDA context in this (the API) process
        util = float(kw.get("gpu_memory_utilization", 0.9))
        sizing.check_gpu_fit(
            dims,
            slot_bytes=slot_bytes,
            devices=devices,
            utilization=util,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
        )
        total = devices[0][1]
        ranks = f" on each of {tp * pp} GPUs" if tp * pp > 1 else ""
        line = f"GPU memory: {util} of {sizing.format_bytes(total)}{ranks}; weights {sizing.format_bytes(dims.weights_bytes)}, "
        return kw, line + f"expert slots {sizing.format_bytes(slot_bytes)} in all, the rest is KV cache"
    if sizing.cpu_kv_env_set():
        kw.pop("kv_cache_memory_bytes", None)  # vLLM replaces it by the variable anyway
        value = os.environ[sizing.CPU_KV_ENV]
        return (
            kw,
            f"KV cache: {sizing.CPU_KV_ENV}={value} GiB from the environment (unset it to size it here)",
        )
    given = kw.get("kv_cache_memory_bytes")
    available = sizing.available_memory()
    max_len = int(kw.get("max_model_len") or dims.max_position or 2048)
    if kw.get("max_model_len") is None and given is None:
        fit = sizing.fit_max_model_len(dims, max_len, slot_bytes=slot_bytes, available=available)
        if 0 < fit < max_len:
            log.warning("context shortened to %d tokens so that the KV cache fits memory", fit)
            kw["max_model_len"] = max_len = fit
    plan = sizing.plan_kv_cache(
        dims,
        max_model_len=max_len,
        max_num_seqs=int(kw.get("max_num_seqs") or CPU_MAX_NUM_SEQS),
        slot_bytes=slot_bytes,
        available=available,
        kv_cache_memory=None if given is None else int(given),
    )
    kw["kv_cache_memory_bytes"] = plan.kv_bytes
    return kw, plan.describe()


_MEMORY_WORDS = re.compile(r"memory|kv cache|out of memory", re.I)


@contextlib.contextmanager
def _memory_errors(plan: str):
    """Start-up failures caused by memory become one MemoryBudgetError line with the numbers and flags."""
    try:
        yield
    except MemoryBudgetError:
        raise
    except Exception as exc:
        chain, e = [], exc
        while e is not None and len(chain) < 5:
            chain.append(e)
            e = e.__cause__ or e.__context__
        hit = next((str(x) for x in chain if _MEMORY_WORDS.search(str(x))), None)
        if hit is None and "initialization failed" in str(exc):  # engine core in its own process
            raise EngineError(
                f"the vLLM engine failed to start (its error is in the log above) [{plan}]",
                hint="if that error is about memory, pass --kv-cache-memory SIZE, a smaller --max-model-len "
                "or fewer --slots",
            ) from exc
        if hit is None:
            raise
        first = " ".join(hit.split())
        first = first if len(first) <= 240 else first[:237] + "..."
        raise MemoryBudgetError(
            f"the engine did not fit in memory: {first} [{plan}]",
            hint="pass --kv-cache-memory SIZE, a smaller --max-model-len, or fewer --slots",
        ) from exc


def _with_set(params, ref: SetRef | None):
    """A copy of SamplingParams `params` that carries the set row of `ref` (0: the base) in extra_args."""
    from vllm import SamplingParams

    sp = params.clone() if params is not None else SamplingParams()
    sp.extra_args = {**(sp.extra_args or {}), SET_ROW_KEY: ref.set_row if ref else 0}
    return sp


def _salted(prompt: Any, ref: SetRef | None) -> Any:
    """The prompt with the set's prefix-cache salt (`SetRef.cache_salt`): KV blocks computed under one
    expert set must never be reused by a request for another. A salt the caller already set is kept."""
    if ref is None:
        return prompt
    salt = ref.cache_salt
    if isinstance(prompt, str):
        return {"prompt": prompt, "cache_salt": salt}
    if isinstance(prompt, dict):
        return {"cache_salt": salt, **prompt}
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": list(prompt), "cache_salt": salt}
    return prompt


def _run_now(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its awaits are synchronous calls) to its end, without an
    event loop: how the offline engine runs the transactions it shares with the async engine."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("expertlib: a synchronous engine transaction suspended")


def _cache_budget(budget: int | None) -> int:
    """The workers' host cache of recent sets: as given, else a tenth of free memory (at most 4 GiB)."""
    from expertlib import sizing

    return int(budget) if budget is not None else sizing.host_cache_budget(sizing.available_memory())


def _verify_always(mode: str) -> bool:
    """`verify_loads`: "once" (hash a set file once, trust it while unchanged) or "always"."""
    if mode not in ("once", "always"):
        raise EngineError(
            f"verify_loads must be 'once' or 'always', not {mode!r}", hint="pass once or always"
        )
    return mode == "always"


def _check_worker(info: dict[str, Any], base: BaseCheckpoint, slots: int, max_sets: int) -> None:
    want = {
        "num_experts": base.num_experts,
        "slots": slots,
        "max_sets": max_sets,
        "moe_layers": base.moe_layers,
    }
    got = {k: info.get(k) for k in want}
    if got != want:
        raise EngineError(f"the vLLM workers report slot layout {got}, expected {want}")


# --- offline engine --------------------------------------------------------------------------------------


class ExpertEngine:
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

        self.base = BaseCheckpoint(resolve_base(base))
        self._book = _SetBook(self.base, slots, max_sets, weight_bound)
        host_cache = engine_kwargs.pop("host_cache", None)
        self._book.verify_always = _verify_always(engine_kwargs.pop("verify_loads", "once"))
        kwargs, self.memory = size_memory(self.base, slots, engine_kwargs)
        with _memory_errors(self.memory):
            self.llm = LLM(**_engine_kwargs(self.base, slots, max_sets, kwargs))
        _run_now(self._book.start(self._rpc, _cache_budget(host_cache)))

    async def _rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return self.llm.collective_rpc(method, args=args)  # synchronous: never suspends

    def load(self, es: ExpertSet | str | Path, name: str | None = None, pin: bool = False) -> str:
        """Load a set (file or ExpertSet) into free slots, evicting LRU unpinned sets; returns its name."""
        es, name, path = self._book.open(es, name)
        return _run_now(self._book.load(es, name, path, pin, self._rpc))

    def unload(self, name: str) -> None:
        _run_now(self._book.unload(name, self._rpc))

    def ref(self, name: str) -> SetRef:
        """The SetRef of a loaded set (NotLoadedError otherwise); `generate` takes it or the name."""
        ref = self._book.ref(name)
        if ref is None:
            raise NotLoadedError("the base model is not an expert set", hint="pass None for the base")
        return ref

    def pin(self, name: str, pinned: bool = True) -> None:
        self._book.pin(name, pinned)

    def loaded_sets(self) -> list[str]:
        return self._book.pool.loaded()

    def status(self) -> dict[str, Any]:
        return self._book.status()

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
        per_request = [_with_set(p, r) for p, r in zip(params, refs, strict=True)]
        salted = [_salted(p, r) for p, r in zip(prompt_list, refs, strict=True)]
        return self.llm.generate(salted, per_request, use_tqdm=use_tqdm)

    def shutdown(self) -> None:
        """Stop the engine core and its worker processes (tensor-parallel workers included)."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> ExpertEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# --- async engine ----------------------------------------------------------------------------------------


async def _load_poll() -> None:
    """How the async engine waits for the workers' background read of a set: requests run meanwhile."""
    await asyncio.sleep(0.005)


class AsyncExpertEngine:
    """vLLM's `AsyncLLM` on one base model; sets load and unload while requests stream."""

    def __init__(
        self, engine, base: BaseCheckpoint, slots: int, max_sets: int, weight_bound: float = DEFAULT_FACTOR
    ):
        self.engine = engine
        self.base = base
        self._book = _SetBook(base, slots, max_sets, weight_bound)
        self._lock = asyncio.Lock()
        self._drained: dict[str, asyncio.Event] = {}
        self._checked = False
        self.memory = ""  # what size_memory chose (one line)
        self.host_cache_budget: int | None = None
        #: called with a set's name when a request names a set that is not resident (load on demand)
        self.on_missing: Any = None
        self._freed = asyncio.Event()  # set (and replaced) whenever a resident set may become evictable

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

        ckpt = BaseCheckpoint(resolve_base(base))
        engine_kwargs.setdefault("disable_log_stats", True)
        host_cache = engine_kwargs.pop("host_cache", None)
        verify_always = _verify_always(engine_kwargs.pop("verify_loads", "once"))
        kwargs, memory = size_memory(ckpt, slots, engine_kwargs)
        log.info("%s", memory)
        with _memory_errors(memory):
            args = AsyncEngineArgs(**_engine_kwargs(ckpt, slots, max_sets, kwargs))
            engine = cls(AsyncLLM.from_engine_args(args), ckpt, slots, max_sets, weight_bound)
        engine.memory = memory
        engine.host_cache_budget = _cache_budget(host_cache)
        engine._book.verify_always = verify_always
        return engine

    async def _rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return await self.engine.collective_rpc(method, args=args)

    async def _check(self) -> None:
        if not self._checked:
            await self._book.start(self._rpc, self.host_cache_budget)
            self._checked = True

    async def load(self, es: ExpertSet | str | Path, name: str | None = None, pin: bool = False) -> str:
        es, name, path = await asyncio.to_thread(self._book.open, es, name)
        async with self._lock:
            await self._check()
            return await self._book.load(es, name, path, pin, self._rpc, _load_poll)

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

    def loaded_sets(self) -> list[str]:
        return self._book.pool.loaded()

    def status(self) -> dict[str, Any]:
        return self._book.status()

    def ref(self, name: str) -> SetRef:
        """The SetRef of a loaded set (NotLoadedError otherwise): what a request carries to `generate`."""
        ref = self._book.ref(name)
        if ref is None:
            raise NotLoadedError("the base model is not an expert set", hint="pass None for the base")
        return ref

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
        prompt = _salted(prompt, ref)
        name = ref.name if ref else None
        self._book.acquire(name)  # no await since ref(): the set cannot be evicted in between
        try:
            async for out in self.engine.generate(prompt, _with_set(sampling_params, ref), request_id):
                yield out
        finally:
            self._book.release(name)
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
        try:
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args={CAPTURE_KEY: row})
            prompt = {"prompt_token_ids": list(prompt_ids), "cache_salt": f"expertlib-route-{tag}"}
            async for _ in self.engine.generate(prompt, _with_set(params, None), f"route-{tag}"):
                pass
        finally:
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


__all__ = ["AsyncExpertEngine", "BaseCheckpoint", "ExpertEngine", "NotLoadedError", "SetRef"]
