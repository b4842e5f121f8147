"""`expertlib serve` as a real process for the end-to-end tests: start it, wait until /health says
ready, stop it (terminate, then kill) when the block ends; and an app served in a thread
(`ServerThread`). One place for what every such test does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from expertlib.server import free_port, wait_ready

#: The tests' environment for a served tiny model: in-process engine core, 1 GiB of KV cache, offline.
TEST_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class ServerThread:
    """An ASGI `app` served by uvicorn in a daemon thread on 127.0.0.1 (a free port unless given)
    while the `with` block runs; `url` is its address. `config` goes to uvicorn.Config."""

    def __init__(self, app, port: int | None = None, **config):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"log_level": "warning", **config}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        """Until GET /health answers 200 (an expertlib server's engine is up)."""
        wait_ready(self.url, timeout_s=timeout, interval_s=0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_argv(*args: str) -> list[str]:
    """`expertlib serve ARGS...` run with this interpreter (the venv's console script)."""
    return [sys.executable, "-m", "expertlib.cli.main", "serve", *args]


class ServerProcess:
    """A started `expertlib serve` process logging to `log_path`; `wait_ready()` before using `url`."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **TEST_ENV} if env is None else env
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300, on_status: Callable[[int], None] | None = None) -> None:
        """Poll /health until it answers 200; `on_status` sees every other status it answers first."""
        wait_ready(self.url, timeout_s=timeout_s, proc=self.proc, log_path=self.log_path, on_status=on_status)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
