"""The web view at /ui: the registry's sets, one set's page, the expert-overlap heatmap and diff of chosen
sets, and (under `expertlib serve`) the server's live state. Server-rendered Jinja2 templates
(`server/templates/`, autoescaped: every name, tag, description and manifest string is escaped).

Keys follow the routes they mirror: the set pages take what `/v1` takes (the API key or the admin key;
open when the server has no API key), the live page what `/metrics` takes (the metrics key or the admin
key; open when the server has no key at all); the registry's own app takes its token. A browser cannot
send a bearer header when it navigates, so `/ui/login` takes a key in a form and sets a cookie
(HttpOnly, SameSite=Strict, Secure over https) holding an HMAC of the key, never the key itself;
`Authorization: Bearer KEY` works too. Changing the key ends every session.

    mount(app, UiSource(registry=lambda: reg, keys=lambda page: None))   # open, registry pages only
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from expertlib.errors import ExpertlibError, NotFoundError
from expertlib.server.auth import bearer

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "expertlib_ui"
#: page kinds: "sets" (registry pages) and "live" (the server's state)
PAGES = ("sets", "live")
MAX_DIFF_SETS = 8

templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape is on for .html
router = APIRouter(prefix="/ui", include_in_schema=False)
_plot_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe


@dataclass
class UiSource:
    """What one app's web view shows and who may see it.

    `registry()` the registry (or None); `keys(page)` the keys a page kind accepts, None when it is
    open; `live()` the running server's `ServerState` (None: no live page, e.g. the registry app)."""

    registry: Callable[[], Any]
    keys: Callable[[str], list[str | None] | None]
    live: Callable[[], Any] | None = None


def mount(app: FastAPI, source: UiSource) -> None:
    app.state.ui = source
    app.include_router(router)


def serve_keys(settings) -> Callable[[str], list[str | None] | None]:
    """`expertlib serve`'s rules (`expertlib.server.auth`): sets pages as /v1, the live page as /metrics."""

    def keys(page: str) -> list[str | None] | None:
        metrics_key = getattr(settings, "metrics_key", None)
        if page == "live":
            any_key = any(k is not None for k in (settings.api_key, settings.admin_key, metrics_key))
            return [metrics_key, settings.admin_key] if any_key else None
        return None if settings.api_key is None else [settings.api_key, settings.admin_key]

    return keys


def token_keys(token: str | None) -> Callable[[str], list[str | None] | None]:
    """The registry app's rule: its one token for every page (open without one)."""
    return lambda page: None if token is None else [token]


def session_token(key: str) -> str:
    """What the session cookie holds for `key`: an HMAC of it (the key never leaves the login form)."""
    return hmac.new(key.encode(), b"expertlib web view session", hashlib.sha256).hexdigest()


def _holds(request: Request, key: str) -> bool:
    given, cookie = bearer(request), request.cookies.get(COOKIE)
    return bool(
        (given and hmac.compare_digest(given.encode(), key.encode()))
        or (cookie and hmac.compare_digest(cookie.encode(), session_token(key).encode()))
    )


def allowed(request: Request, page: str) -> bool:
    accepted = request.app.state.ui.keys(page)
    return accepted is None or any(k is not None and _holds(request, k) for k in accepted)


def _all_keys(request: Request) -> list[str]:
    return sorted({k for page in PAGES for k in (request.app.state.ui.keys(page) or []) if k is not None})


# --- rendering ---------------------------------------------------------------------------------------


def render(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
    source: UiSource = request.app.state.ui
    context.setdefault("title", "expertlib")
    return templates.TemplateResponse(
        request,
        template,
        {"has_live": source.live is not None, "secured": bool(_all_keys(request)), **context},
        status_code=status,
    )


def login_page(request: Request, page: str, error: str | None = None, status: int = 401) -> HTMLResponse:
    need = "the metrics key or the admin key" if page == "live" else "the server's key"
    return render(
        request,
        "login.html",
        status,
        title="Log in",
        next=_safe_next(str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")),
        need=need,
        error=error,
    )


def _safe_next(path: str) -> str:
    """Only a path of this web view: never another site, never a scheme."""
    return path if path.startswith("/ui") and "//" not in path and "\\" not in path else "/ui"


def _page(request: Request, page: str, build: Callable[[], dict], template: str) -> Response:
    """The page, or the login form (401) without the right key, or an error page."""
    if not allowed(request, page):
        return login_page(request, page)
    try:
        return render(request, template, **build())
    except ExpertlibError as exc:
        return render(
            request, "error.html", exc.http_status, title="Error", message=exc.message, hint=exc.hint
        )


def _registry(request: Request):
    reg = request.app.state.ui.registry()
    if reg is None:
        raise NotFoundError(
            "this server has no registry", hint="start it with --registry DIR to see the expert sets here"
        )
    return reg


# --- routes -------------------------------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def sets_page(request: Request) -> Response:
    from expertlib.server.ui_views import sets_view

    return _page(request, "sets", lambda: sets_view(_registry(request)), "sets.html")


@router.get("/sets/{ref}", response_class=HTMLResponse)
def set_page(request: Request, ref: str) -> Response:
    from expertlib.server.ui_views import set_view

    return _page(request, "sets", lambda: set_view(_registry(request), ref), "set.html")


@router.get("/diff", response_class=HTMLResponse)
def diff_page(request: Request, ref: list[str] = Query(default=[])) -> Response:  # noqa: B006
    from expertlib.server.ui_views import diff_view

    def build() -> dict:
        refs = list(dict.fromkeys(r for r in ref if r))
        if not 2 <= len(refs) <= MAX_DIFF_SETS:
            from expertlib.errors import InvalidRequestError

            raise InvalidRequestError(
                f"choose 2 to {MAX_DIFF_SETS} expert sets to compare, not {len(refs)}",
                hint="tick the sets on the list page, then Compare",
            )
        return diff_view(_registry(request), refs, heatmap_svg)

    return _page(request, "sets", build, "diff.html")


@router.get("/live", response_class=HTMLResponse)
def live_page(request: Request) -> Response:
    from expertlib.server.ui_views import live_view

    source: UiSource = request.app.state.ui
    if source.live is None:
        return render(request, "error.html", 404, title="Error", message="no live state here", hint="")
    return _page(request, "live", lambda: live_view(source.live()), "live.html")


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui") -> Response:
    return render(request, "login.html", title="Log in", next=_safe_next(next), need="a key", error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/ui"])[0])
    match = next(
        (k for k in _all_keys(request) if hmac.compare_digest(k.encode(), key.encode())),
        None,
    )
    if match is None:
        if not _all_keys(request):
            return RedirectResponse(target, status_code=303)  # an open server: nothing to log in to
        return login_page(request, "sets", error="that key is not valid here")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        session_token(match),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


def heatmap_svg(report) -> str:
    """The overlap heatmap of `expertlib diff --plot` (`registry.diff.plot_diff`) as an SVG data URI
    (an <img> source: nothing in it can run)."""
    from expertlib.registry.diff import plot_diff

    with tempfile.TemporaryDirectory() as d, _plot_lock:
        path = plot_diff(report, Path(d) / "overlap.svg")
        return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode()
