"""The demo's server: `expertlib serve` as a child process, asked through the openai client, and left
running after the demo returns (one at a time, recorded in the cache, stopped by `expertlib demo --stop`).

    proc, url = start_server(base, registry, ["sum@1", "fill@1"], port, workdir / "server.log")
    wait_ready(url, timeout_s=600, proc=proc, log_path=workdir / "server.log")   # expertlib.server
    rows, acc, picks = ask_server(url, ["sum", "fill"], settings)
    keep_serving(proc, url, workdir / "server.log")     # or stop_server(proc)
    stop_kept()                                          # what `expertlib demo --stop` does

The server runs in a session of its own (Ctrl-C in the demo's terminal does not reach it), writes
to a log file in the demo's work folder, and is recorded in `$EXPERTLIB_CACHE/demo/server.json`
with its pid and the process's start time, so a later `stop_kept` never signals a process that
merely reuses the pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from expertlib.demo.base import cache_dir
from expertlib.demo.tasks import get_task

#: The name the demo base is served under.
BASE_NAME = "demo-base"
#: Where the running demo server is recorded (under the cache's demo folder).
STATE_FILE = "server.json"
#: The `model` that lets the server choose the set from the prompt's routing.
AUTO = "auto"


def state_path() -> Path:
    return cache_dir() / "demo" / STATE_FILE


def start_server(
    base: Path,
    registry: str | None,
    sets: Sequence[str],
    port: int,
    log_path: Path,
    *,
    max_sets: int = 8,
    slots: int | None = None,
):
    """`expertlib serve` as a child process in its own session; returns (process, url).

    float32 like the in-process evaluation (vLLM's CPU default is bfloat16), so served answers can be
    compared token for token with in-process ones; eager (no graph compilation): the demo's engine
    is ready sooner than a compiled one, and a model this small decodes as fast.
    `max_sets` leaves rows for the compositions the demo asks (a+b is one more resident set);
    `slots` (extra expert slots per layer) sizes a server started before its sets exist.
    """
    cmd = [sys.executable, "-m", "expertlib.cli.main", "serve", str(base), "--served-name", BASE_NAME]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--max-sets", str(max_sets)]
    cmd += ["--engine-arg", "dtype=float32", "--engine-arg", "enforce_eager=true"]
    if slots is not None:
        cmd += ["--slots", str(slots)]
    if registry:
        cmd += ["--registry", registry]
    for name in sets:
        cmd += ["--expert-set", name]
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "w")  # noqa: SIM115 - handed to the child, closed in stop_server/keep_serving
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    proc._expertlib_log = logf  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


def _close_log(proc) -> None:
    log = getattr(proc, "_expertlib_log", None)
    if log is not None:
        log.close()


def stop_server(proc, timeout_s: float = 30.0) -> None:
    """Stop a server this process started (SIGINT to its process group, SIGKILL after `timeout_s`)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _close_log(proc)


def keep_serving(proc, url: str, log_path: Path, **info: Any) -> Path:
    """Leave the server running after this process ends: record it (pid, its start time, url, log)
    for `stop_kept`; returns the record's path."""
    import psutil

    record = {
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "url": url,
        "log": str(log_path),
        "started_at": time.time(),
        **info,
    }
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    _close_log(proc)  # the child keeps its own descriptor
    return path


def kept_server() -> dict[str, Any] | None:
    """The recorded demo server if it is still running (same pid and start time), else None."""
    import psutil

    path = state_path()
    try:
        record = json.loads(path.read_text())
        p = psutil.Process(int(record["pid"]))
        same = abs(p.create_time() - float(record["create_time"])) < 0.5
        if same and p.status() != psutil.STATUS_ZOMBIE:
            return record
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        pass
    return None


def stop_kept(timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Stop the recorded demo server (SIGINT to its process group, SIGKILL after `timeout_s`) and
    forget it; returns its record, or None when none was running (a stale record is removed)."""
    import psutil

    record = kept_server()
    if record is not None:
        pid = int(record["pid"])
        p = psutil.Process(pid)
        try:
            os.killpg(pid, signal.SIGINT)  # its own session: the process group is its pid
            p.wait(timeout_s)
        except psutil.TimeoutExpired:
            os.killpg(pid, signal.SIGKILL)
            p.wait(timeout_s)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    state_path().unlink(missing_ok=True)
    return record


def ask_server(
    url: str,
    tasks: Sequence[str],
    n_ask: int,
    n_eval: int,
    seed: int,
    *,
    compose: Sequence[str] = (),
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Ask each task's first `n_ask` eval questions through the openai client: naming its set, with
    `model="auto"` (the server picks the set from the prompt's routing), and naming the base; with
    `compose` (two or more tasks), also every such task's questions of the composition `a+b`.

    Returns one row per question (the response's `model` says which set served it) and per task the
    accuracy of each way of asking: {"set", "auto", "base"} (+ the composition's name), and "auto
    picked set": the share of auto's answers the task's own set served. A composition the server
    refuses (sets replacing the same expert: 400) is one row with its `error`, and no accuracy.
    """
    from openai import BadRequestError, OpenAI

    from expertlib.demo.evaluate import answer_budget

    client = OpenAI(base_url=url + "/v1", api_key="not-needed")
    composed = "+".join(compose) if len(compose) >= 2 else None
    rows: list[dict] = []
    acc: dict[str, dict[str, float]] = {}
    for task in tasks:
        t = get_task(task)
        every = t.split(n_train=0, n_eval=n_eval, seed=seed).eval
        exs = every[:n_ask]
        budget = answer_budget(every)  # the in-process evaluation's token budget, so answers compare
        ways: dict[str, str] = {"set": task, "auto": AUTO, "base": BASE_NAME}
        if composed and task in compose:
            ways[composed] = composed
        acc[task] = {}
        for way, model in ways.items():
            correct = picked = 0
            for ex in exs:
                try:
                    resp = client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": ex.prompt}],
                        max_tokens=budget,
                        temperature=0.0,
                    )
                except BadRequestError as exc:
                    if model != composed:
                        raise
                    rows.append({"task": task, "model": model, "served_by": "", "error": exc.message})
                    break
                got = resp.choices[0].message.content or ""
                ok = bool(t.score(got, ex.answer))
                correct += ok
                picked += served_task(resp.model) == task
                rows.append(
                    {
                        "task": task,
                        "model": model,
                        "served_by": resp.model,
                        "prompt": ex.prompt,
                        "expected": ex.answer,
                        "answer": got.strip(),
                        "correct": ok,
                    }
                )
            if rows and rows[-1].get("error"):
                continue
            acc[task][way] = round(correct / max(1, len(exs)), 4)
            if way == "auto":
                acc[task]["auto picked set"] = round(picked / max(1, len(exs)), 4)
    return rows, acc


def served_task(model: str) -> str:
    """The task of a response's `model` ('sum@1' -> 'sum'; the base's name stays itself)."""
    return model.split("@", 1)[0]


def ui_links(url: str, refs: Sequence[str]) -> dict[str, str]:
    """The web view's pages a newcomer opens: the sets with their scores, the heatmap, the live state."""
    from urllib.parse import urlencode

    return {
        "sets and scores": f"{url}/ui",
        "expert-overlap heatmap": f"{url}/ui/diff?" + urlencode([("ref", r) for r in refs]),
        "live server state": f"{url}/ui/live",
    }


def print_kept(record: dict[str, Any] | None, log: Callable[[str], None] = print) -> None:
    if record is None:
        log("no demo server is running")
    else:
        log(f"stopped the demo server at {record['url']} (pid {record['pid']})")
