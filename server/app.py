"""Assemble the FastAPI application of one server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI

from expertlib import __version__
from expertlib.server import admin, routes
from expertlib.server.errors import install_error_handlers
from expertlib.server.state import EngineFactory, ServerSettings, ServerState


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
    app.state.server = state
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(routes.v1)
    app.include_router(admin.router)
    reg = admin.registry_router()
    if reg is not None:
        app.include_router(reg)
    return app
