"""Several publishing processes at once, and a publisher killed in the middle of a publish."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from expertlib.registry import Registry
from expertlib.registry.blobs import HOOK_ENV, file_digest
from expertlib.registry.testing import tiny_base_identity, write_expert_set

N_PROCS, N_EACH = 4, 3


def _publish_many(root: str, paths: list[str], barrier, out) -> None:
    reg = Registry(root)
    barrier.wait(timeout=120)
    refs = [str(reg.publish(p).ref) for p in paths]
    out.put(refs)


def test_concurrent_publishers_never_lose_or_duplicate(tmp_path):
    base = tiny_base_identity()
    root = tmp_path / "reg"
    Registry(root)  # created once; each process opens it on its own
    paths = [
        [
            str(
                write_expert_set(
                    tmp_path / f"p{i}-{j}.safetensors", "math", base, {0: [i, j + 4]}, seed=10 * i + j
                )
            )
            for j in range(N_EACH)
        ]
        for i in range(N_PROCS)
    ]
    # fork: the children start at once with everything imported (the parent ran no threaded torch op);
    # each opens its own SQLite connections after the fork
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, out = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [
        ctx.Process(target=_publish_many, args=(str(root), paths[i], barrier, out)) for i in range(N_PROCS)
    ]
    for p in procs:
        p.start()
    results, deadline = [], time.time() + 180
    while len(results) < N_PROCS:  # fail fast when a publisher dies
        try:
            results.append(out.get(timeout=0.5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.time() < deadline, f"publisher processes failed: exit codes {dead}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    refs = sorted(r for rs in results for r in rs)
    entries = Registry(root).list()
    assert sorted(str(e.ref) for e in entries) == refs
    assert [e.version for e in entries] == list(range(1, N_PROCS * N_EACH + 1))
    assert len({e.digest for e in entries}) == N_PROCS * N_EACH
    assert {e.digest for e in entries} == {file_digest(p) for ps in paths for p in ps}
    assert Registry(root).verify().ok


_PUBLISHER = textwrap.dedent(
    """
    import sys
    from expertlib.registry import Registry
    Registry(sys.argv[1]).publish(sys.argv[2])
    """
)


@pytest.mark.parametrize("stage", ["write", "commit"])
def test_publisher_killed_mid_publish_leaves_nothing_visible(tmp_path, stage):
    base = tiny_base_identity()
    root = tmp_path / "reg"
    reg = Registry(root)
    # big enough that "write" stops with the temp file partly written (first 1 MiB chunk only)
    p = write_expert_set(
        tmp_path / "big.safetensors",
        "math",
        base,
        {0: list(range(8)), 1: list(range(8))},
        hidden=256,
        inter=128,
    )
    assert p.stat().st_size > 2 << 20
    marker = tmp_path / "at-hook"
    env = {**os.environ, HOOK_ENV: f"{stage}:{marker}"}
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root), str(p)], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "publisher exited before reaching the hook"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)

    assert reg.list() == []  # no partial entry
    report = reg.verify()
    assert report.ok and report.checked == 0
    for d in reg.blobs.iter_digests():  # anything visible in blobs/ is complete and intact
        assert file_digest(reg.blobs.path(d)) == d
    temps = list(reg.blobs.tmp_dir.iterdir())
    if stage == "write":
        assert len(temps) == 1 and temps[0].stat().st_size < p.stat().st_size
        assert list(reg.blobs.iter_digests()) == []
    else:
        assert temps == [] and len(list(reg.blobs.iter_digests())) == 1
    gc = reg.gc()  # the writer's pid is dead: its temp file is stale at once; the orphan blob goes too
    assert len(gc.removed_temps) + len(gc.removed_blobs) == 1
    assert list(reg.blobs.tmp_dir.iterdir()) == [] and list(reg.blobs.iter_digests()) == []
    # the killed writer held no lock that survives it
    e = reg.publish(p)
    assert (
        e.version == 1 and reg.verify().ok and Path(reg.get_path("math")).stat().st_size == p.stat().st_size
    )
