"""N engine replicas under Ray Serve, set-aware routing through Ray's model multiplexing.

    expertlib serve ./base --registry reg --all --replicas 2 [--ray-address ray://head:10001]

Two deployments:

- `ExpertReplica` (N replicas): each runs the whole single-engine server of this package, its own
  engine, slots and catalog (`create_app`, started in the replica's constructor), and answers
  requests by calling that app in process, so every route, error and key check is the one
  `expertlib serve` has. The sets a replica holds are Ray's multiplexed models:
  `@serve.multiplexed(max_num_models_per_replica=max_sets)` loads a set on a replica's first request
  for it, and when Ray evicts the least recently used one it unloads it from the engine (its slots
  are freed).
- `SetRouter` (the HTTP ingress, one replica): reads `model` from an inference request's JSON body
  and sends it with `handle.options(multiplexed_model_id=model)`, so Ray routes it to a replica that
  holds the set, else to the one holding the fewest. Requests for the base and the other routes
  (/v1/models, /health, /metrics, admin) go to any replica. Each answer carries the replica that
  served it in the header `x-expertlib-replica`.

Sets named at start (`--expert-set`, `--all`) are loaded on every replica (each replica's server
loads them before it is ready) and registered with Ray's multiplexer, so they count against its
`max_sets`. Admin routes and /metrics reach one replica (any): per-replica state is read there, and
Ray's own metrics (`serve_num_multiplexed_models`, `serve_multiplexed_model_load_latency_ms`) cover
all replicas.

Needs the optional extra `expertlib[ray]` (`pip install "ray[serve]"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from expertlib.errors import EngineError, ExpertlibError, InvalidRequestError
from expertlib.server.settings import ServerSettings

log = logging.getLogger("expertlib.server")

REPLICA_HEADER = "x-expertlib-replica"
#: The routes whose JSON body names the expert set (`model`): routed by it.
INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise EngineError(
            "--replicas needs Ray Serve, which is not installed",
            hint='pip install "expertlib[ray]" (or "ray[serve]")',
        ) from None
    return ray, serve


def model_of(path: str, body: bytes) -> str | None:
    """The `model` an inference request names (None for other routes or a body that is not JSON)."""
    if path not in INFERENCE_PATHS:
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


class Resident:
    """A set Ray's multiplexer holds on one replica; Ray calls `__del__` when it evicts it (least
    recently used), which unloads it from this replica's engine."""

    def __init__(self, state: Any, model: str, served: str | None, loop: asyncio.AbstractEventLoop):
        self.state, self.model, self.served, self.loop = state, model, served, loop
        self.unloaded = served is None

    def __del__(self) -> None:
        if self.unloaded:
            return
        self.unloaded = True
        future = asyncio.run_coroutine_threadsafe(self._unload(), self.loop)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # Ray calls this from a worker thread: wait, so the slots are free after
            future.result(timeout=300)

    async def _unload(self) -> None:
        try:
            await self.state.catalog.unload(self.served)
            log.info("expert set %s evicted by Ray's multiplexer (as %r)", self.served, self.model)
        except ExpertlibError:  # already gone (the engine's own LRU, an admin unload)
            pass


async def call_app(app: Any, method: str, path: str, query: bytes, headers: list, body: bytes):
    """Call an ASGI app in process; yield (status, headers) first, then the body's chunks as they are
    sent (a streamed answer streams)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, queue.put)
        finally:
            await queue.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await queue.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body" and message.get("body"):
                yield message["body"]
        await task
    finally:
        done.set()  # a consumer that stops (client gone) disconnects the app's request
        if not task.done():
            task.cancel()


def build_app(settings: ServerSettings, replicas: int, *, replica_options: dict | None = None) -> Any:
    """The Ray Serve application: `replicas` engine replicas behind the set router."""
    ray, serve = _ray()
    max_sets = settings.max_sets or 8
    base_names = {settings.base, settings.model_name}

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options=replica_options or {"num_cpus": 0},
        max_constructor_retry_count=2,  # a start that fails (a set that does not fit) fails the deploy
    )
    class ExpertReplica:
        async def __init__(self, settings: dict):
            from expertlib.server.app import create_app

            # validated here: the replica's expertlib may be another build than the driver's
            self.app = create_app(ServerSettings.model_validate(settings))
            self.state = self.app.state.server
            await self.state.start()  # the app's lifespan does this under uvicorn
            if self.state.startup_error is not None:
                raise self.state.startup_error
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.loads = 0
            for name in self.state.catalog.loaded():  # the sets named at start: Ray learns they are here
                await self.resident(name)

        @serve.multiplexed(max_num_models_per_replica=max_sets)
        async def resident(self, model: str) -> Resident:
            ref = await self.state.catalog.resolve(model)  # loads it on this replica's first request
            self.loads += 1
            return Resident(self.state, model, ref.name if ref else None, asyncio.get_running_loop())

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            model = serve.get_multiplexed_model_id()
            if model:
                with contextlib.suppress(ExpertlibError):  # the app answers it, OpenAI-shaped
                    await self.resident(model)
            first = True
            async for item in call_app(self.app, method, path, query, headers, body):
                if first:
                    status, head = item
                    yield status, [*head, (REPLICA_HEADER, self.replica)]
                    first = False
                else:
                    yield item

        def shutdown_engine(self) -> None:
            self.state.shutdown()

        def __del__(self) -> None:
            state = getattr(self, "state", None)
            if state is not None:
                state.shutdown()

    front = FastAPI(title="expertlib (replicated)")

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(front)
    class SetRouter:
        def __init__(self, replicas: Any):
            self.replicas = replicas

        @front.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def forward(self, request: Request, path: str):
            body = await request.body()
            model = model_of("/" + path, body)
            options: dict[str, Any] = {"stream": True}
            if model is not None and model not in base_names:
                options["multiplexed_model_id"] = model
            headers = [(k.encode(), v.encode()) for k, v in request.headers.items()]
            stream = self.replicas.options(**options).handle.remote(
                request.method, "/" + path, request.url.query.encode(), headers, body
            )
            status, head = await stream.__anext__()
            drop = {"content-length", "transfer-encoding"}

            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in stream:
                    yield chunk

            return StreamingResponse(
                chunks(), status_code=status, headers={k: v for k, v in head if k.lower() not in drop}
            )

    return SetRouter.bind(ExpertReplica.bind(settings.model_dump(exclude_unset=True)))


def serve_replicated(
    settings: ServerSettings,
    replicas: int,
    *,
    ray_address: str | None = None,
    replica_options: dict | None = None,
    block: bool = True,
) -> Any:
    """Run `replicas` engine replicas under Ray Serve, the OpenAI API at settings.host:port; block
    until interrupted (or return the app's handle with block=False)."""
    ray, serve = _ray()
    if replicas < 1:
        raise InvalidRequestError(f"--replicas must be >= 1, not {replicas}", param="replicas")
    if not ray.is_initialized():
        ray.init(address=ray_address, ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle = serve.run(build_app(settings, replicas, replica_options=replica_options), name="expertlib")
    log.info("%d replicas ready; OpenAI API at http://%s:%s/v1", replicas, settings.host, settings.port)
    if not block:
        return handle
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return None
