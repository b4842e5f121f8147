"""N engine replicas under Ray Serve, set-aware routing through Ray's model multiplexing.

    expertlib serve ./base --registry reg --all --replicas 2 [--ray-address ray://head:10001]

Two deployments:

- `ExpertReplica` (N replicas): each runs the whole single-engine server of this package, its own
  engine, slots and catalog (`create_app`, started in the replica's constructor), and answers
  requests by calling that app in process, so every route, error and key check is the one
  `expertlib serve` has. The sets a replica holds are Ray's multiplexed models:
  `@serve.multiplexed(max_num_models_per_replica=max_sets)` loads a set on a replica's first request
  for it, and when Ray evicts the least recently used one the set leaves Ray's routing and the
  engine's own LRU frees its slots for the set being loaded, once no running request uses it
  (`Resident`).
- `SetRouter` (the HTTP ingress, one replica): reads `model` from an inference request's JSON body
  and sends it with `handle.options(multiplexed_model_id=model)`, so Ray routes it to a replica that
  holds the set, else to the one holding the fewest. Requests for the base and the other routes
  (/v1/models, /health, /metrics, admin) go to any replica. Each answer carries the replica that
  served it in the header `x-expertlib-replica`.

Sets named at start (`--expert-set`, `--all`) are loaded on every replica (each replica's server
loads them before it is ready) and registered with Ray's multiplexer, so they count against its
`max_sets`. Pinned sets (`--pin`) are kept on every replica, outside Ray's multiplexer: a request for
one goes to any replica (every replica holds it, so the load is spread), Ray never evicts it, and
each replica's multiplexer gets `max_sets - len(pins)` places for the others. (Pinning on K of N
replicas would need a second routing table beside Ray's; a set hot enough to want several replicas is
better served by Ray's own routing, which keeps it on the replicas its requests went to.)

Per-replica counters: each replica counts the requests naming a set by whether it already held the
set when the request arrived (`resident="yes"`) or had to load it (`"no"`), its loads and Ray's
evictions, and reports them after each request to a small named Ray actor (`ReplicaBoard`). A GET
/metrics through the router is answered by one replica (which checks the metrics key) followed by
every replica's counters, labelled `replica` (`expertlib.server.metrics.render_replicas`); Ray's own
metrics (`serve_num_multiplexed_models`, `serve_multiplexed_model_load_latency_ms`) cover all
replicas too. Admin routes reach one replica (any).

Faults: a replica that dies under a request ends it at once: a streamed answer with an OpenAI-shaped
`error` event (and no `[DONE]`), any other with 503 + Retry-After. Ray Serve starts a replacement;
meanwhile the other replicas answer.

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
from expertlib.server.errors import error_body
from expertlib.server.settings import ServerSettings

log = logging.getLogger("expertlib.server")

REPLICA_HEADER = "x-expertlib-replica"
#: the named Ray actor holding every replica's counters, and its namespace
BOARD, BOARD_NAMESPACE = "expertlib-replica-board", "expertlib"
#: seconds between a replica's reports when it serves nothing (it also reports after each request)
REPORT_EVERY_S = 10.0
#: what a client is told when the replica serving its request went away
REPLICA_LOST = "the replica serving this request stopped"
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
    """A set Ray's multiplexer holds on one replica. Ray calls `__del__` when it evicts the set (least
    recently used): the set leaves Ray's routing, and stays in the engine's slots until the engine's
    own LRU needs the room for the next set, which happens at once when Ray evicted it to load one,
    and never under a running request. (Unloading it right away raced the requests Ray was still
    sending for it, which the engine refuses while it unloads a set.)"""

    def __init__(self, model: str, served: str | None, on_evict: Any = None):
        self.model, self.served = model, served
        self.on_evict = on_evict  # called (model) when Ray evicts it
        self.evicted = served is None

    def __del__(self) -> None:
        if self.evicted:
            return
        self.evicted = True
        log.info("expert set %s left Ray's multiplexer (as %r)", self.served, self.model)
        if self.on_evict is not None:
            self.on_evict(self.model)


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
        "client": None,  # unknown here: no client address may open /metrics (--metrics-open)
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


class ReplicaBoard:
    """Every replica's counters, as each last reported them (a named Ray actor, `BOARD`)."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict] = {}

    def report(self, replica: str, counters: dict) -> None:
        self.replicas[replica] = counters

    def snapshot(self) -> dict[str, dict]:
        return self.replicas


def board(create: bool = False) -> Any:
    """The ReplicaBoard actor of this Ray cluster (created with `create`; None when there is none)."""
    ray, _ = _ray()
    if create:
        actor = ray.remote(num_cpus=0)(ReplicaBoard)
        return actor.options(
            name=BOARD, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
    try:
        return ray.get_actor(BOARD, namespace=BOARD_NAMESPACE)
    except ValueError:
        return None


def replica_stats(timeout: float = 30.0) -> dict[str, dict]:
    """Per replica id: the counters it last reported (`requests`: model -> {"yes": hits, "no": misses},
    `sets`, `loads`, `evictions`, `app`, `pid`, `node`, `time`). Call from a process connected to the cluster."""
    ray, _ = _ray()
    actor = board()
    return {} if actor is None else ray.get(actor.snapshot.remote(), timeout=timeout)


def hit_rate(before: dict[str, dict], after: dict[str, dict]) -> tuple[int, int]:
    """(requests that found their set resident, requests naming a set) between two `replica_stats`."""
    hits = total = 0
    for replica, now in after.items():
        then = before.get(replica, {}).get("requests", {})
        for model, counts in now.get("requests", {}).items():
            old = then.get(model, {})
            yes, no = counts.get("yes", 0) - old.get("yes", 0), counts.get("no", 0) - old.get("no", 0)
            hits, total = hits + yes, total + yes + no
    return hits, total


def build_app(settings: ServerSettings, replicas: int, *, replica_options: dict | None = None) -> Any:
    """The Ray Serve application: `replicas` engine replicas behind the set router."""
    ray, serve = _ray()
    max_sets = settings.max_sets or 8
    pins = list(settings.pins)
    if pins and len(pins) >= max_sets:
        raise InvalidRequestError(
            f"{len(pins)} pinned sets leave no room among --max-sets {max_sets} for the others",
            param="pins",
            hint="raise --max-sets or pin fewer sets",
        )
    unrouted = {settings.base, settings.model_name, *pins}  # any replica answers these

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options=replica_options or {"num_cpus": 0},
        max_constructor_retry_count=2,  # a start that fails (a set that does not fit) fails the deploy
    )
    class ExpertReplica:
        async def __init__(self, settings: dict):
            import os

            from expertlib.server.app import create_app

            # validated here: the replica's expertlib may be another build than the driver's
            self.app = create_app(ServerSettings.model_validate(settings))
            self.state = self.app.state.server
            await self.state.start()  # the app's lifespan does this under uvicorn
            if self.state.startup_error is not None:
                raise self.state.startup_error
            context = serve.get_replica_context()
            self.replica = context.replica_id.unique_id
            self.loads = self.evictions = 0
            self.served_of: dict[str, str] = {}  # model -> served name, for every set loaded here
            self.requests: dict[str, dict[str, int]] = {}
            self.where = {
                "app": context.app_name,
                "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(),
            }
            self.board = board(create=True)
            self.pinned = {p: (await self.state.catalog.resolve(p)).name for p in pins}
            for name in self.state.catalog.loaded():  # the sets named at start: Ray learns they are here
                if name not in self.pinned.values():
                    await self.resident(name)
            self.report()
            self.heartbeat = asyncio.create_task(self.report_every(REPORT_EVERY_S))

        async def report_every(self, seconds: float) -> None:
            """Report while alive, so a replica that stops reporting is known to be gone."""
            while True:
                await asyncio.sleep(seconds)
                self.report()

        @serve.multiplexed(max_num_models_per_replica=max_sets - len(pins))
        async def resident(self, model: str) -> Resident:
            before = set(self.state.catalog.loaded())
            ref = await self.state.catalog.resolve(model)  # loads it on this replica's first request
            if ref is not None and ref.name not in before:
                self.loads += 1
            if ref is not None:
                self.served_of[model] = ref.name
            return Resident(model, ref.name if ref else None, self.evicted)

        def evicted(self, model: str) -> None:
            self.evictions += 1

        def holds(self, model: str) -> bool:
            """Whether the set `model` names is resident in this replica's engine now (before this
            request loads it)."""
            served = self.pinned.get(model) or self.served_of.get(model)
            return served is not None and served in set(self.state.catalog.loaded())

        def report(self) -> None:
            counters = {
                **self.where,
                "requests": self.requests,
                "sets": sorted(self.state.catalog.loaded()),
                "loads": self.loads,
                "evictions": self.evictions,
                "time": time.time(),
            }
            self.board.report.remote(self.replica, counters)  # not awaited: a request never waits on it

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            model = serve.get_multiplexed_model_id() or model_of(path, body)
            counted = model is not None and model not in (settings.base, settings.model_name)
            if counted:
                counts = self.requests.setdefault(model, {"yes": 0, "no": 0})
                counts["yes" if self.holds(model) else "no"] += 1
                if model not in self.pinned:
                    with contextlib.suppress(ExpertlibError):  # the app answers it, OpenAI-shaped
                        await self.resident(model)
            try:
                first = True
                async for item in call_app(self.app, method, path, query, headers, body):
                    if first:
                        status, head = item
                        yield status, [*head, (REPLICA_HEADER, self.replica)]
                        first = False
                    else:
                        yield item
            finally:
                if counted:
                    self.report()

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
            if model is not None and model not in unrouted:
                options["multiplexed_model_id"] = model
            headers = [(k.encode(), v.encode()) for k, v in request.headers.items()]
            stream = self.replicas.options(**options).handle.remote(
                request.method, "/" + path, request.url.query.encode(), headers, body
            )
            try:
                status, head = await stream.__anext__()
            except Exception as exc:  # noqa: BLE001 - the replica died (or Ray could not reach it)
                log.warning("a replica failed before answering %s /%s: %s", request.method, path, exc)
                return lost()
            drop = {"content-length", "transfer-encoding"}
            events = any(k.lower() == "content-type" and "text/event-stream" in v for k, v in head)
            tail = b""
            if path == "metrics" and request.method == "GET" and status == 200:  # the key was checked
                from expertlib.server.metrics import render_replicas

                actor = board()
                tail = render_replicas(await actor.snapshot.remote()) if actor is not None else b""

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in stream:
                        yield chunk
                except Exception as exc:  # noqa: BLE001 - the replica died mid-answer: end it, say why
                    log.warning("a replica failed while answering %s /%s: %s", request.method, path, exc)
                    if events:
                        yield (
                            b"data: "
                            + json.dumps(error_body(503, REPLICA_LOST + "; retry")).encode()
                            + b"\n\n"
                        )
                    return
                if tail:
                    yield tail

            return StreamingResponse(
                chunks(), status_code=status, headers={k: v for k, v in head if k.lower() not in drop}
            )

    return SetRouter.bind(ExpertReplica.bind(settings.model_dump(exclude_unset=True)))


def lost() -> Any:
    """The answer to a request whose replica died before answering: 503 + Retry-After, OpenAI-shaped."""
    from fastapi.responses import JSONResponse

    return JSONResponse(
        error_body(503, REPLICA_LOST + "; retry"), status_code=503, headers={"Retry-After": "1"}
    )


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
    old = board()
    if old is not None:  # a previous deployment's counters
        ray.kill(old)
    board(create=True)
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
        with contextlib.suppress(Exception):
            ray.kill(board())
    return None
