"""The state one running server holds: engine, catalog of sets, admission gate (the bounded queue),
tokenizer, readiness and metrics. Its settings are `expertlib.server.settings.ServerSettings`."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from expertlib.checkpoint import BaseCheckpoint
from expertlib.errors import ExpertlibError, InvalidRequestError, NotReadyError, QueueFullError, SlotError
from expertlib.server.backend import ServingEngine, maybe_await
from expertlib.server.limits import TokenizerPool, prompt_char_limit
from expertlib.server.metrics import ServerMetrics
from expertlib.server.sets import SetCatalog
from expertlib.server.settings import ServerSettings

log = logging.getLogger("expertlib.server")

EngineFactory = Callable[[ServerSettings], Any]


def default_engine_factory(settings: ServerSettings) -> ServingEngine:
    from expertlib.engine import AsyncExpertEngine

    kwargs = dict(settings.engine_args)
    if isinstance(settings.slots, int):
        kwargs["slots"] = settings.slots
    if settings.max_sets is not None:
        kwargs["max_sets"] = settings.max_sets
    if settings.kv_cache_memory is not None:
        kwargs.setdefault("kv_cache_memory_bytes", settings.kv_cache_memory)
    if settings.max_model_len is not None:
        kwargs.setdefault("max_model_len", settings.max_model_len)
    if settings.host_cache_memory is not None:
        kwargs["host_cache"] = settings.host_cache_memory
    if settings.packed_cache_disk is not None:
        kwargs["packed_cache"] = settings.packed_cache_disk
    kwargs["weight_bound"] = settings.weight_bound
    if settings.verify_loads != "once":
        kwargs["verify_loads"] = settings.verify_loads
    return AsyncExpertEngine.from_base(settings.base, **kwargs)


def plan_start(settings: ServerSettings, catalog: SetCatalog, names: list[str]) -> ServerSettings:
    """Settings with `--slots auto` resolved for the sets named at start (`expertlib.sizing.plan_slots`);
    SlotError with the numbers when they cannot all be resident. Unchanged when BASE is no local model
    (then the engine's defaults apply and its own start reports the problem)."""
    from expertlib.engine import resolve_base
    from expertlib.sizing import ServingSizes, plan_slots

    try:
        base = BaseCheckpoint(resolve_base(settings.base))
    except ExpertlibError:
        return settings.model_copy(update={"slots": None}) if settings.slots == "auto" else settings
    dims = ServingSizes.of(base, settings.engine_args.get("dtype"))
    plan = plan_slots(
        dims,
        {name: catalog.expert_map(name) for name in names},
        catalog.registered_maps(),
        slots=settings.slots,
        max_sets=settings.max_sets,
        expert_memory=settings.expert_memory,
    )
    log.info("%s", plan.describe())
    return settings.model_copy(update={"slots": plan.slots, "max_sets": plan.max_sets})


def open_registry(root: str | None, *, create: bool = False) -> Any:
    """The registry at `root`; without one, the default registry if it exists or `create` (else None)."""
    from expertlib.registry import Registry, default_root
    from expertlib.registry.index import SERVING_BUSY_TIMEOUT_MS

    if root is None:
        if not create and not (default_root() / "index.db").is_file():
            return None
        root = default_root()
    # a locked index answers 503 + Retry-After within a second instead of holding requests
    return Registry(root, busy_timeout=SERVING_BUSY_TIMEOUT_MS / 1000)


class AdmissionQueue:
    """The bounded queue: at most `limit` sequences admitted (waiting or running); a request counts
    as many sequences as it generates (prompts x n), and one request at most `per_request`."""

    def __init__(self, limit: int, metrics: ServerMetrics, per_request: int | None = None):
        self.limit = limit
        self.per_request = min(per_request or limit, limit)
        self.depth = 0
        self.metrics = metrics
        metrics.queue_limit.set(limit)

    def check(self, sequences: int) -> None:
        """InvalidRequestError when one request asks for more than `per_request` sequences."""
        if sequences > self.per_request:
            raise InvalidRequestError(
                f"this request asks for {sequences} sequences (prompts x n); the limit is {self.per_request}",
                param="n",
                hint="split the prompts over several requests, or lower n",
            )

    def enter(self, sequences: int = 1) -> Callable[[], None]:
        """Admit a request of `sequences` sequences or raise (InvalidRequestError when one request
        asks for more than `per_request`, QueueFullError when the queue is full); returns its
        (idempotent) release."""
        self.check(sequences)
        if self.depth + sequences > self.limit:
            raise QueueFullError(
                f"the server is at its limit of {self.limit} concurrent sequences",
                hint="retry after a short wait",
            )
        self.depth += sequences
        self.metrics.queue_depth.set(self.depth)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.depth -= sequences
                self.metrics.queue_depth.set(self.depth)

        return release


class ServerState:
    def __init__(
        self, settings: ServerSettings, *, engine_factory: EngineFactory | None = None, registry: Any = None
    ):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.admission = AdmissionQueue(settings.max_queue, self.metrics, settings.max_request_sequences)
        self.engine_factory = engine_factory or default_engine_factory
        self.registry = registry
        self.engine: ServingEngine | None = None
        self.catalog: SetCatalog | None = None
        self.tokenizer: Any = None
        self.tokenize_pool = TokenizerPool()
        self.max_model_len: int | None = settings.max_model_len
        self.ready = False
        self.startup_error: BaseException | None = None
        self.on_startup_failure: Callable[[BaseException], None] | None = None  # e.g. stop uvicorn
        self.created = 0
        self.prepacker: Any = None  # expertlib.server.prepack.Prepacker, when on

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the engine, load the requested sets, then mark ready. Errors end in startup_error."""
        import time

        self.created = int(time.time())
        try:
            if self.registry is None:
                pulls = self.settings.pull_from is not None
                self.registry = open_registry(self.settings.registry, create=pulls)
            if self.settings.pull_from is not None:  # sets the registry lacks come from the remote
                from expertlib.registry.pullthrough import PullThrough

                self.registry = await asyncio.to_thread(PullThrough, self.registry, self.settings.pull_from)
            catalog = SetCatalog(
                None,  # the engine comes below
                self.settings.model_name,
                self.registry,
                registry_base=self.settings.base if Path(self.settings.base).is_dir() else None,
                load_on_demand=self.settings.load_on_demand,
                on_load=self.metrics.observe_load,
            )
            catalog.base_names.add(self.settings.base)
            names = list(self.settings.expert_sets)
            if self.settings.all_sets:
                names += [str(r) for r in catalog.registered() if str(r) not in names]
            names += [n for n in self.settings.pins if n not in names]
            for name in names:  # fail fast, before the engine starts, on a name that cannot load
                catalog.check(name)
            sized = await asyncio.to_thread(plan_start, self.settings, catalog, names)
            if inspect.iscoroutinefunction(self.engine_factory):
                engine = await self.engine_factory(sized)
            else:  # engine start takes seconds: keep answering /health (503) meanwhile
                engine = await asyncio.to_thread(self.engine_factory, sized)
            self.engine = catalog.engine = engine
            self.catalog = catalog
            self.metrics.watch(self)
            if hasattr(engine, "on_missing"):
                engine.on_missing = catalog.reload  # a set evicted under a request is loaded again
            self.tokenizer = await maybe_await(engine.get_tokenizer())
            if self.max_model_len is None:
                self.max_model_len = _max_model_len(engine, self.settings.base)
            await self._load_named(names)
            self.refresh_metrics()
            self.ready = True
            self.metrics.ready.set(1)
            self._start_prepacker()
            s = self.settings
            log.info("ready: base %s, expert sets %s", s.model_name, self.catalog.loaded() or "none")
            log.info("OpenAI API at http://%s:%s/v1", s.host, s.port)
        except Exception as exc:  # reported by /health, and by the CLI, which then exits
            self.startup_error = exc
            log.error("startup failed: %s", exc)
            if self.on_startup_failure is not None:
                self.on_startup_failure(exc)

    async def _load_named(self, names: list[str]) -> None:
        """Load the sets named at start, each pinned until all are in: start-up never evicts a set it
        was asked to load (a set that does not fit fails the start with the slot numbers)."""
        assert self.catalog is not None and self.engine is not None
        served = [await self.catalog.load(name, pin=True) for name in names]
        keep = {s for s, n in zip(served, names, strict=True) if n in self.settings.pins}  # --pin: for good
        for name in served:
            if name not in keep:
                await self.catalog.pin(name, False)
        missing = [n for n in served if n not in set(self.catalog.loaded())]
        if missing:
            raise SlotError(f"expert sets {missing} were evicted during start-up", hint="pass more --slots")

    def _start_prepacker(self) -> None:
        """Pack the registry's sets ahead of their first request (`--prepack`), where that can help."""
        s = self.settings
        if not s.prepack or self.registry is None or s.packed_cache_disk == 0 or s.verify_loads != "once":
            return
        if not hasattr(self.engine, "prepack"):
            return
        from expertlib.server.prepack import Prepacker

        self.prepacker = Prepacker(self.engine, self.catalog)
        self.prepacker.start()

    def shutdown(self) -> None:
        if self.prepacker is not None:
            self.prepacker.stop()
        self.tokenize_pool.shutdown()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.ready = False

    # --- helpers for routes ---------------------------------------------------------------------

    @property
    def prompt_char_limit(self) -> int | None:
        """The most characters one prompt may have (checked before tokenizing)."""
        return prompt_char_limit(self.max_model_len, self.settings.max_prompt_chars)

    def require_ready(self) -> tuple[ServingEngine, SetCatalog]:
        if not self.ready or self.engine is None or self.catalog is None:
            if self.startup_error is not None:
                raise NotReadyError(
                    f"the server failed to start: {self.startup_error}", hint="see the server log"
                )
            raise NotReadyError(
                "the server is starting (engine and expert sets loading)", hint="retry shortly"
            )
        return self.engine, self.catalog

    def refresh_metrics(self) -> None:
        if self.engine is not None:
            try:
                self.metrics.observe_engine(self.engine.status(), len(self.engine.loaded_sets()))
            except ExpertlibError as exc:
                log.warning("engine status failed: %s", exc)


def _max_model_len(engine: Any, base: str) -> int | None:
    vllm_config = getattr(getattr(engine, "engine", None), "model_config", None)  # AsyncLLM's
    candidates = (
        getattr(engine, "max_model_len", None),
        _safe_status(engine).get("max_model_len"),
        getattr(vllm_config, "max_model_len", None),
    )
    for value in candidates:
        if isinstance(value, int):
            return value
    config = Path(base) / "config.json"
    if config.is_file():
        import json

        return json.loads(config.read_text()).get("max_position_embeddings")
    return None


def _safe_status(engine: Any) -> dict:
    try:
        return dict(engine.status())
    except Exception:  # noqa: BLE001 - optional information
        return {}
