"""A registry served on its own over HTTP (the registry's routes without a model), e.g. a team's shared
registry that `expertlib push/pull http(s)://host/v1/registry` talks to.

    app = registry_app(Registry("./reg"), token="s3cret")     # uvicorn.run(app, port=8100)

The routes are `expertlib.server.registry_routes.router` (also mounted by `expertlib serve` under its admin
routes); this module adds the optional bearer token and the server's one error translation.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request

from expertlib.errors import AuthenticationError
from expertlib.registry.local import RegistryStore
from expertlib.server import ui
from expertlib.server.auth import bearer
from expertlib.server.errors import install_error_handlers
from expertlib.server.registry_routes import router


def registry_app(
    registry: RegistryStore, *, prefix: str = "/v1/registry", token: str | None = None
) -> FastAPI:
    """A standalone app serving `registry` under `prefix`.

    With `token`, every route needs `Authorization: Bearer <token>`; without, the app is open.
    """
    app = FastAPI(title="expertlib registry")
    app.state.registry = registry
    deps = [Depends(_token_check(token))] if token else []
    app.include_router(router, prefix=prefix, dependencies=deps)
    ui.mount(app, ui.UiSource(registry=lambda: registry, keys=ui.token_keys(token)))  # the web view, /ui
    install_error_handlers(app)
    return app


def _token_check(token: str):
    def check(request: Request) -> None:
        given = bearer(request)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthenticationError("missing or invalid token", hint="send 'Authorization: Bearer <token>'")

    return check
