"""Processes started for vLLM die with the process that started them.

vLLM runs its engine core (and, with tensor parallelism, its workers) in child processes. A server
killed with SIGKILL cannot stop them, and they would keep running, holding the model's memory (and
GPUs) until someone finds them. Every such child watches its parent: a daemon thread polls the
parent's pid, and once the child has been re-parented (its parent is gone) it sends itself SIGTERM
(the engine core then stops its own workers) and SIGKILL `GRACE_S` later.

The watch starts in every vLLM child: `register()` (the plugin entry point) starts it in processes
that multiprocessing spawned, and a fork hook in children forked from a process that loaded the
plugin (vLLM forks by default, and a forked child does not load plugins again).

Not `prctl(PR_SET_PDEATHSIG)`: Linux sends that signal when the *thread* that forked the child
exits, and the server starts its engine from a pool thread, so a finished thread would kill a
healthy engine.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

log = logging.getLogger("expertlib.lifeline")

#: Seconds between two looks at the parent's pid.
POLL_S = 0.5
#: Seconds between SIGTERM and SIGKILL once the parent is gone.
GRACE_S = 5.0

_state = {"watching": False, "hooked": False}


def watch_parent(parent_pid: int | None = None) -> bool:
    """Start the watch in this process (once); `parent_pid`: the parent it must outlive (default: the
    current parent). Returns whether a watch was started now."""
    if _state["watching"]:
        return False
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    _state["watching"] = True
    threading.Thread(target=_watch, args=(parent_pid,), name="expertlib-lifeline", daemon=True).start()
    return True


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    log.warning("expertlib: parent process %d is gone; stopping process %d", parent_pid, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _after_fork_in_child() -> None:
    _state["watching"] = False  # the parent's watch thread did not survive the fork
    watch_parent()


def install() -> None:
    """Watch the parent if this process is a multiprocessing child; watch in every child forked from
    here on (idempotent)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        if parent.is_alive():
            watch_parent(os.getppid())
        else:  # gone before we looked
            watch_parent(-1)
    if not _state["hooked"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _state["hooked"] = True
