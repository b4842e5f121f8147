"""The OpenAI-compatible HTTP server: one base model, every task's expert set.

    from expertlib.server import ServerSettings, create_app, serve
    serve(ServerSettings(base="./base", registry="./reg", expert_sets=["math", "code@2"]))

`model` in a request selects the expert set (`task`, `task@version`, `task@tag`) or the base.
"""

from expertlib.server.app import create_app
from expertlib.server.state import ServerSettings, ServerState

__all__ = ["ServerSettings", "ServerState", "create_app", "serve"]


def serve(settings: ServerSettings, **app_kwargs) -> None:
    """Run the server in the foreground until interrupted."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings, **app_kwargs), host=settings.host, port=settings.port, log_level="info")
