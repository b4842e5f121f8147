"""The OpenAI-compatible HTTP server: one base model, every task's expert set.

    from expertlib.server import ServerSettings, create_app, serve
    serve(ServerSettings(base="./base", registry="./reg", expert_sets=["math", "code@2"]))

`model` in a request selects the expert set (`task`, `task@version`, `task@tag`) or the base.
"""

from expertlib.server.app import create_app
from expertlib.server.state import ServerSettings, ServerState

__all__ = ["ServerSettings", "ServerState", "create_app", "serve"]


def serve(settings: ServerSettings, **app_kwargs) -> None:
    """Run the server in the foreground until interrupted; raise the error if startup fails."""
    import logging

    import uvicorn

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


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
