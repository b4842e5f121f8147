"""API keys: `Authorization: Bearer KEY`. The API key guards inference routes (when set); the
admin key guards admin routes (admin routes are off without one). The admin key also works on
inference routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from expertlib.errors import AuthenticationError, ForbiddenError


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _eq(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def check_api_key(request: Request) -> None:
    settings = request.app.state.server.settings
    if settings.api_key is None:
        return
    token = bearer(request)
    if token is None:
        raise AuthenticationError("no API key given", hint="send 'Authorization: Bearer <key>'")
    if not (_eq(token, settings.api_key) or _eq(token, settings.admin_key)):
        raise AuthenticationError(
            "invalid API key", hint="check the key the server was started with (--api-key)"
        )


def check_admin_key(request: Request) -> None:
    settings = request.app.state.server.settings
    if settings.admin_key is None:
        raise ForbiddenError("admin routes are disabled", hint="start the server with --admin-key KEY")
    token = bearer(request)
    if token is None:
        raise AuthenticationError("no admin key given", hint="send 'Authorization: Bearer <admin key>'")
    if _eq(token, settings.admin_key):
        return
    if _eq(token, settings.api_key):
        raise ForbiddenError("the API key may not use admin routes", hint="use the admin key (--admin-key)")
    raise AuthenticationError(
        "invalid admin key", hint="check the key the server was started with (--admin-key)"
    )
