"""`make install`'s two installers side by side: scripts/install.sh with uv and with pip (INSTALLER=pip),
each into a fresh virtual environment with an empty package cache of its own, started together so
the machine's load and the network weigh on both alike.

    python bench/install_speed.py                # prints both wall times and the ratio
    python bench/install_speed.py --keep         # leave the two environments (in --workdir)

Downloads the whole install twice (~2.5 GB each) from the configured package sources.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(installer: str, workdir: Path) -> tuple[subprocess.Popen, float]:
    venv = workdir / f"venv-{installer}"
    cache = workdir / f"cache-{installer}"
    env = dict(
        os.environ,
        INSTALLER=installer,
        VENV=str(venv),
        PIP_CACHE_DIR=str(cache / "pip"),
        UV_CACHE_DIR=str(cache / "uv"),
    )
    log = open(workdir / f"{installer}.log", "w")  # noqa: SIM115 - the child's, closed with the process
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "install.sh")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="where the environments go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the environments and logs")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="expertlib-install-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {name: start(name, workdir) for name in ("uv", "pip")}
    took: dict[str, float] = {}
    while len(took) < len(runs):
        for name, (proc, t0) in runs.items():
            if name not in took and proc.poll() is not None:
                took[name] = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(
                        f"{name}: failed ({proc.returncode}); log: {workdir / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return 1
        time.sleep(1.0)
    fell_back = "uv failed" in (workdir / "uv.log").read_text()
    print(
        f"install with uv:  {took['uv']:.0f} s" + ("  (uv failed: this is pip's time)" if fell_back else "")
    )
    print(f"install with pip: {took['pip']:.0f} s")
    print(
        f"uv / pip: {took['uv'] / took['pip']:.2f}  (both started together, empty caches, {os.cpu_count()} CPUs)"
    )
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
