"""The OpenAI-compatible HTTP server: one base model, every task's expert set.

    expertlib serve ./base --registry ./reg --expert-set math --expert-set code@2 --api-key KEY

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.completions.create(model="math", prompt="2+2=", max_tokens=8)        # math's experts
    client.chat.completions.create(model="code@2", messages=[...], stream=True)  # code, version 2
    client.completions.create(model="./base", prompt="2+2=")                     # the base model

`model` selects the expert set (`task`, `task@version`, `task@tag`, or the base's name); requests
for different sets go to one engine concurrently and share its batches. Admin routes (`--admin-key`)
load, unload and pin sets while serving and carry the registry's pull/push routes.

From Python: `serve(ServerSettings(...))` runs in the foreground; `create_app(settings)` gives the
FastAPI app (the engine starts in the background when the app starts; /health is 503 until ready).

Files: protocol.py (HTTP bodies), routes.py and admin.py (the routes), generation.py (completions
over the engine), logprobs.py (vLLM logprobs in OpenAI's shapes), tools.py (tool calls through
vLLM's parsers), tokens.py (/tokenize, /detokenize), sets.py (model names -> SetRefs, loading sets
from the registry), prepack.py (the registry's sets packed ahead of their first request), settings.py
(ServerSettings, which `expertlib serve`'s options are built from), state.py (readiness, bounded
queue), limits.py (JSON nesting and prompt character caps, the tokenizer pool), errors.py (the one
place errors become OpenAI-shaped responses), auth.py, metrics.py, backend.py (the engine protocol
the server is written against).

`create_app` and `ServerState` are imported on first use, so `expertlib.server.settings` (what the
CLI needs to build its options) loads without the web stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertlib.server.settings import ServerSettings

if TYPE_CHECKING:
    from expertlib.server.app import create_app
    from expertlib.server.state import ServerState

__all__ = ["ServerSettings", "ServerState", "create_app", "free_port", "serve", "wait_ready"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from expertlib.server.app import create_app

        return create_app
    if name == "ServerState":
        from expertlib.server.state import ServerState

        return ServerState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(settings: ServerSettings, **app_kwargs) -> None:
    """Run the server in the foreground until interrupted; raise the error if startup fails."""
    import logging

    import uvicorn

    from expertlib.server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("expertlib.server")
    if settings.api_key is None and not _is_loopback(settings.host):
        log.warning("serving on %s without --api-key: anyone who can reach it can use it", settings.host)
    app = create_app(settings, **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info"))
    state: ServerState = app.state.server
    state.on_startup_failure = lambda _exc: setattr(server, "should_exit", True)
    server.run()
    if state.startup_error is not None:
        raise state.startup_error


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server started in another process or thread."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(
    url: str,
    *,
    timeout_s: float = 300.0,
    proc=None,
    log_path: str | Path | None = None,
    interval_s: float = 0.5,
    on_status: Callable[[int], None] | None = None,
) -> None:
    """Poll `url`/health until it answers 200 (the engine is up), for a server started in another
    process or thread. `proc` (its `subprocess.Popen`) exiting first raises EngineError, `timeout_s`
    passing raises NotReadyError, both with the end of `log_path`; `on_status` sees every other
    status /health answers on the way (503 while the engine starts)."""
    import contextlib
    import time

    import httpx

    from expertlib.errors import EngineError, NotReadyError

    def log_tail() -> str:
        return ":\n" + Path(log_path).read_text(errors="replace")[-4000:] if log_path is not None else ""

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise EngineError(f"the server at {url} exited with code {proc.returncode}{log_tail()}")
        status = None
        with contextlib.suppress(httpx.TransportError):
            status = httpx.get(url + "/health", timeout=5).status_code
        if status == 200:
            return
        if status is not None and on_status is not None:
            on_status(status)
        if time.monotonic() > deadline:
            raise NotReadyError(f"the server at {url} was not ready after {timeout_s:.0f} s{log_tail()}")
        time.sleep(interval_s)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
