"""API keys: `Authorization: Bearer KEY`. The API key guards inference routes (when set); the
admin key guards admin routes (admin routes are off without one). The admin key also works on
inference routes. /metrics takes the metrics key or the admin key, and the API docs any key, as
soon as the server has one; /metrics alone also answers without a key to a client connecting from a
`--metrics-open` network. `check_route` runs them all by path before a request body is read."""

from __future__ import annotations

import functools
import hmac
import ipaddress

from fastapi import Request

from expertlib.errors import AuthenticationError, ForbiddenError
from expertlib.server.settings import metrics_network


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


def _any_key(settings) -> bool:
    return any(
        k is not None for k in (settings.api_key, settings.admin_key, getattr(settings, "metrics_key", None))
    )


#: Headers a proxy adds: a request carrying one came through a proxy, so the address it connected
#: from is the proxy's, not the client's (and uvicorn may have taken the client from X-Forwarded-For)
FORWARDED_HEADERS = (b"x-forwarded-for", b"forwarded")


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(metrics_network(c) for c in cidrs)


def metrics_open_to(request: Request) -> bool:
    """Whether /metrics answers `request` without a key: the address it connected from is in one of
    the `--metrics-open` networks (an IPv4 client seen by an IPv6 socket as ::ffff:a.b.c.d counts as
    a.b.c.d) and it carries no forwarding header. No address, or one that is not an IP, is not open."""
    cidrs = getattr(request.app.state.server.settings, "metrics_open", None)
    if not cidrs or request.client is None:
        return False
    if any(name in FORWARDED_HEADERS for name, _ in request.scope.get("headers", ())):
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    candidates = [address]
    if address.version == 6 and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(a in net for a in candidates for net in _networks(tuple(cidrs)))


def check_metrics_key(request: Request) -> None:
    """/metrics names the loaded sets: open on a server without any key, and to the clients of the
    `--metrics-open` networks."""
    settings = request.app.state.server.settings
    if not _any_key(settings) or metrics_open_to(request):
        return
    token = bearer(request)
    if token is None:
        raise AuthenticationError(
            "no metrics key given", hint="send 'Authorization: Bearer <metrics key or admin key>'"
        )
    if not (_eq(token, getattr(settings, "metrics_key", None)) or _eq(token, settings.admin_key)):
        raise AuthenticationError(
            "invalid metrics key",
            hint="use the key the server was started with (--metrics-key or --admin-key)",
        )


def check_docs_key(request: Request) -> None:
    """The API docs (/docs, /redoc, /openapi.json): any inference or admin key once the server has keys."""
    settings = request.app.state.server.settings
    if not _any_key(settings):
        return
    token = bearer(request)
    if not (_eq(token, settings.api_key) or _eq(token, settings.admin_key)):
        raise AuthenticationError("the API docs need a key", hint="send 'Authorization: Bearer <key>'")


DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


#: The one route open without a key (load balancers probe it).
OPEN_PATHS = ("/health",)


def check_route(request: Request) -> None:
    """The key check of the route `request` goes to, by path (runs before its body is read). Every
    path but /health needs a key: the admin routes the admin key, /metrics (but from a
    `--metrics-open` network) and the API docs theirs, everything else (/v1/*, /tokenize,
    /detokenize, and any path no route serves) the API key."""
    path = request.url.path
    if path == "/ui" or path.startswith("/ui/"):
        return  # the web view applies these rules itself, to a bearer key or its login cookie (server/ui.py)
    if path in OPEN_PATHS:
        return
    if path.startswith("/admin/") or path == "/admin":
        check_admin_key(request)
    elif path == "/metrics":
        check_metrics_key(request)
    elif path.startswith(DOCS_PATHS):
        check_docs_key(request)
    else:
        check_api_key(request)
