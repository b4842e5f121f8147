"""The GPU checks' CPU dry runs: every step of scripts/gpu_check.sh (no vLLM, the bare GPU machine)
and of scripts/gpu_check_vllm.py runs here on tiny shapes, so the scripts cannot rot between GPU runs.
The first runs with vLLM and the server modules blocked from import, as on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU_STEPS = [
    "environment",
    "ESFT vs full FT, qwen3-30b-a3b",
    "ESFT vs full FT, deepseek-v2-lite",
    "CLI score + train",
    "same selection as CPU",
    "slot pool (transformers)",
    "slot pool throughput, hot load",
    "vLLM remap op in a CUDA graph",
    "set-buffer copy",
]


def _gpu_check(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_without_vllm(tmp_path):
    res = _gpu_check(tmp_path / "out", "--dry-run")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    out = tmp_path / "out"
    # everything under $OUT, the scratch (checkpoints, wheels, package mapping) removed
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    result = json.loads((out / "gpu_check.json").read_text())
    assert [s["step"] for s in result["steps"]] == GPU_STEPS
    assert all(s["status"] == "ok" for s in result["steps"]), result["steps"]
    rows = {r["what"]: r for r in result["rows"]}
    # expertlib ran from the generated package folder (cli/, registry/ mapped under expertlib), not the checkout
    assert rows["expertlib imported from"]["value"].startswith(str(out))
    # CUDA-only figures are skipped and say so; nothing else is
    skipped = sorted(r["what"] for r in result["rows"] if r["value"] == "skipped")
    assert all(rows[w]["note"] == "needs CUDA" for w in skipped) and len(skipped) == 3
    assert "exact" in rows["remap replays after buffer and table changes"]["value"]
    assert "exit 0" in (out / "gpu_check.log").read_text()


def test_gpu_check_exit_status_is_the_checks_own(tmp_path):
    """No GPU without --dry-run: exit 2 at once. A check stopped by the time limit: exit 124, not the
    status of the `tee` that logs it (nor of a `date` call, the old script's bug)."""
    res = _gpu_check(tmp_path / "a")
    assert res.returncode == 2 and "no CUDA GPU" in res.stdout + res.stderr
    res = _gpu_check(tmp_path / "b", "--dry-run", CHECK_TIMEOUT="1")
    assert res.returncode == 124, res.stdout[-3000:]
    assert "exit 124" in (tmp_path / "b" / "gpu_check.log").read_text()


def test_a_misspelt_marker_expression_is_an_error(tmp_path):
    """`-m vlm` used to select nothing and pass; now pytest stops with a usage error."""
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "vlm", "--collect-only", "-p", "no:cacheprovider",
         str(ROOT / "tests/test_vllm_routing.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 4 and "unregistered markers ['vlm']" in res.stdout + res.stderr


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_gpu_check_dry_run(tmp_path):
    pytest.importorskip("vllm")
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts/gpu_check_vllm.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    table = (tmp_path / "gpu_check_vllm.md").read_text()
    for step in ("4 sets into 3 set rows", "mixed batch vs merged-checkpoint vLLM", "sets change the output"):
        assert f"| {step} |" in table and "FAIL" not in table
    assert "mixed / plain vLLM throughput" in table
