"""`expertlib.server.wait_ready`, the one wait-until-/health-answers loop the demo, the benches and the
tests use: it returns on 200, shows the statuses before it, and says why when the server exits or
stays unready (with the end of its log)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from server_process import ServerThread
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from expertlib.errors import EngineError, NotReadyError
from expertlib.server import free_port, wait_ready


def _health_after(n_unready: int) -> Starlette:
    calls = []

    async def health(_request):
        calls.append(1)
        return PlainTextResponse(
            "ok" if len(calls) > n_unready else "starting", 200 if len(calls) > n_unready else 503
        )

    return Starlette(routes=[Route("/health", health)])


def test_returns_once_health_answers_200_and_shows_the_statuses_before():
    seen = []
    with ServerThread(_health_after(2)) as server:
        wait_ready(server.url, timeout_s=10, interval_s=0.01, on_status=seen.append)
    assert seen == [503, 503]


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("early lines\nTraceback: the engine could not start\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(EngineError, match="exited with code 3") as err:
        wait_ready(f"http://127.0.0.1:{free_port()}", proc=proc, log_path=log)
    assert "the engine could not start" in str(err.value)


def test_a_server_never_ready_times_out():
    with ServerThread(_health_after(10**6)) as server, pytest.raises(NotReadyError, match="not ready after"):
        wait_ready(server.url, timeout_s=0.2, interval_s=0.01)
    with pytest.raises(NotReadyError):  # nothing listening at all
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout_s=0.2, interval_s=0.01)
