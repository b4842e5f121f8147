"""Assemble the FastAPI application of one server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from expertlib import __version__
from expertlib.errors import ExpertlibError, RequestTooLargeError
from expertlib.server import admin, routes, ui
from expertlib.server.auth import check_route
from expertlib.server.errors import expertlib_error_body, install_error_handlers, retry_headers
from expertlib.server.limits import check_json_depth
from expertlib.server.state import EngineFactory, ServerSettings, ServerState

#: Routes whose body is an expert-set file (admin key, checked first): not bound by --max-body-bytes.
UPLOAD_PATHS = ("/admin/registry/entries",)
#: Bodies up to this many bytes have their JSON nesting checked on the event loop (larger: a thread).
BODY_CHECK_INLINE = 256 * 1024


def create_app(
    settings: ServerSettings, *, engine_factory: EngineFactory | None = None, registry: Any = None
) -> FastAPI:
    """The app; its engine starts in the background once the app starts (GET /health: 503 until ready)."""
    state = ServerState(settings, engine_factory=engine_factory, registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        startup = asyncio.create_task(state.start())
        app.state.startup = startup
        try:
            yield
        finally:
            if not startup.done():
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await startup
            state.shutdown()

    app = FastAPI(title="expertlib", version=__version__, lifespan=lifespan)
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(routes.v1)
    app.include_router(admin.router)
    reg = admin.registry_router()
    if reg is not None:
        app.include_router(reg)
    web = ui.UiSource(registry=lambda: state.registry, keys=ui.serve_keys(settings), live=lambda: state)
    ui.mount(app, web)  # the web view, /ui
    return app


class RequestGuard:
    """ASGI middleware that runs before any request body is parsed: the route's key check (an
    unauthenticated client cannot make the server read its body), then the body size limit, from
    Content-Length up front and by counting the bytes as they arrive (413 either way), then the JSON
    nesting cap on the bytes (400), before FastAPI or pydantic parse anything."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            check_route(request)
            if not scope["path"].startswith(UPLOAD_PATHS):
                length = request.headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                    raise self._too_large()
                receive = await self._checked_body(receive)
        except ExpertlibError as exc:
            status, body = expertlib_error_body(exc)
            response = JSONResponse(body, status_code=status, headers=retry_headers(exc))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _checked_body(self, receive):
        """Read the whole body (at most max_body_bytes), check its nesting, and return a `receive`
        that hands it to the app, then passes on what the client sends next (a disconnect)."""
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees that
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body_bytes:
                raise self._too_large()
            if not message.get("more_body", False):
                body = b"".join(chunks)
                if len(body) > BODY_CHECK_INLINE:  # tens of ms per MB: off the event loop
                    await asyncio.to_thread(check_json_depth, body)
                else:
                    check_json_depth(body)
                replay = [{"type": "http.request", "body": body, "more_body": False}]
                break

        async def replayed():
            return replay.pop(0) if replay else await receive()

        return replayed

    def _too_large(self) -> RequestTooLargeError:
        return RequestTooLargeError(
            f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
            hint="send a shorter prompt, or start the server with a larger --max-body-bytes",
        )
