"""`expertlib demo --quick` end to end: base, ESFT sets, registry, heatmap, eval, server + openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from expertlib.cli.main import cli


def test_demo_help_documents_the_quick_flag():
    res = CliRunner().invoke(cli, ["demo", "--help"])
    assert res.exit_code == 0
    assert "--quick" in res.output and "Example:" in res.output
    assert "--no-keep-serving" in res.output and "--stop" in res.output


def _sleeper(*, ignore_sigint: bool = False) -> subprocess.Popen:
    """A stand-in for the demo's server: a child in its own session that runs until signalled."""
    code = "import signal, time\n"
    if ignore_sigint:
        code += "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(120)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True, text=True
    )
    assert proc.stdout.readline().strip() == "ready"  # its signal handlers are in place
    return proc


@pytest.mark.parametrize("ignore_sigint", [False, True])
def test_a_kept_server_is_recorded_and_stopped(tmp_path, monkeypatch, ignore_sigint):
    from expertlib.demo import serving

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    proc = _sleeper(ignore_sigint=ignore_sigint)
    try:
        state = serving.keep_serving(proc, "http://127.0.0.1:1", tmp_path / "server.log", port=1)
        assert state == tmp_path / "cache" / "demo" / "server.json" and state.is_file()
        assert serving.kept_server()["pid"] == proc.pid
        stopped = serving.stop_kept(timeout_s=2.0)  # SIGINT, then SIGKILL for one that ignores it
        assert stopped["url"] == "http://127.0.0.1:1"
        assert proc.poll() is not None and not state.exists()
        assert serving.stop_kept() is None  # nothing left to stop
        res = CliRunner().invoke(cli, ["demo", "--stop"])
        assert res.exit_code == 0 and "no demo server is running" in res.output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stale_record_never_signals_the_process_that_reuses_its_pid(tmp_path, monkeypatch):
    from expertlib.demo import serving

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    proc = _sleeper()
    try:
        state = serving.keep_serving(proc, "http://127.0.0.1:1", tmp_path / "server.log")
        record = json.loads(state.read_text())
        record["create_time"] -= 3600  # the recorded server was another process with this pid
        state.write_text(json.dumps(record))
        assert serving.kept_server() is None
        assert serving.stop_kept() is None and not state.exists()
        time.sleep(0.2)
        assert proc.poll() is None  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_the_next_demo_stops_the_server_an_earlier_one_left(tmp_path, monkeypatch):
    from expertlib.demo import run, serving

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    proc = _sleeper()
    serving.keep_serving(proc, "http://127.0.0.1:1", tmp_path / "server.log")

    class Reached(Exception):
        pass

    def base(**_):
        raise Reached

    monkeypatch.setattr(run, "build_demo_base", base)
    said = []
    try:
        with pytest.raises(Reached):  # the old server is gone before the new demo's first step
            run.run_demo(run.DemoSettings(quick=True, workdir=str(tmp_path / "w")), log=said.append)
        assert proc.poll() is not None
        assert said[0] == "stopped the demo server an earlier run left at http://127.0.0.1:1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_refuses_a_general_task():
    from expertlib.demo.run import DemoSettings

    with pytest.raises(ValueError, match="general task"):
        DemoSettings(tasks=("copy",))


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    from expertlib.demo.serving import stop_kept

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EXPERTLIB_REGISTRY", str(tmp_path / "registry"))
    try:
        res = CliRunner().invoke(cli, ["demo", "--quick", "--task", "sum", "--task", "cross", "--json"])
        _check_the_quick_demo(res, tmp_path)
    finally:
        stop_kept()  # the server the demo left running, also when a check above failed


def _check_the_quick_demo(res, tmp_path):
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{\n") :])

    # the shipped base was installed into the cache (not pretrained here), and its experts specialise
    info = report["base_info"]
    assert report["base"].startswith(str(tmp_path / "cache"))
    assert info["final_loss"] < info["first_loss"]
    spec = report["specialisation"]
    assert spec["concentration"]["sum"] > 1.5 * spec["k"] / spec["num_experts"], spec
    assert set(spec["overlap"]["sum"]) >= {"copy", "add", "cross"}

    # expert sets: trained, published, small, and better than the base on their own task
    from expertlib.registry import Registry

    reg = Registry(tmp_path / "registry")
    assert sorted(e.name for e in reg.list()) == ["cross", "sum"]
    for task in ("sum", "cross"):
        s = report["sets"][task]
        assert s["ref"] == f"{task}@1" and s["num_experts"] >= 2
        assert 0 <= s["retention_risk"]["mean_general_mass"] <= 1
        assert s["size_bytes"] < 0.25 * sum(
            f.stat().st_size for f in (tmp_path / "cache").rglob("model.safetensors")
        )
    acc = report["accuracy"]
    for task in ("sum", "cross"):
        assert acc[task][task] > acc["base"][task], acc
    # each set's scores and retention risk are kept with its version (list, show, the web view)
    kept = reg.evals(entries=reg.list())
    for task in ("sum", "cross"):
        recs = {(r.task, r.metric): r.value for r in kept[reg.resolve(task).ref]}
        assert recs[(task, "exact_match")] == acc[task][task]
        assert recs[("copy", "exact_match")] == acc[task]["copy"]  # general ability, kept too
        risk = report["sets"][task]["retention_risk"]["mean_general_mass"]
        assert recs[("retention", "mean_general_mass")] == risk

    # heatmap drawn; server asked through the openai client: each set named, model="auto", the
    # base, and the composition of the first two tasks
    assert Path(report["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["server_error"] is None
    asked = report["served"]
    assert {(r["task"], r["model"]) for r in asked} == {
        *((t, m) for t in ("sum", "cross") for m in (t, "auto", "demo-base", "sum+cross")),
    }
    assert {r["served_by"] for r in asked if r["model"] == "sum"} == {"sum"}  # the name asked for
    assert {r["served_by"] for r in asked if r["model"] == "demo-base"} == {"demo-base"}
    assert {r["served_by"] for r in asked if r["model"] == "auto"} <= {"sum@1", "cross@1", "demo-base"}
    assert {r["served_by"] for r in asked if r["model"] == "sum+cross"} == {"sum+cross"}
    for task in ("sum", "cross"):
        assert set(report["served_accuracy"][task]) == {"set", "auto", "auto picked set", "base", "sum+cross"}
    # what the server answers equals what transformers answers in process for the same set
    # (both float32, greedy, the same token budget). vLLM's kernels may flip one near-tie of a
    # weak model; a set dropped or mixed up on the serving path changes most of its answers.
    named = [r for r in asked if r["model"] in ("sum", "cross", "demo-base")]
    differ = [r for r in named if r["answer"] != r["in_process"]]
    assert len(differ) <= 1, differ
    assert report["timings"]["total_s"] > 0

    # the demo returned and its server still answers: the web view shows the sets and their scores
    import httpx

    from expertlib.demo.serving import kept_server

    assert report["kept"] and kept_server()["url"] == report["url"]
    try:
        page = httpx.get(report["ui"]["sets and scores"], timeout=30).text
        for task in ("sum", "cross"):
            assert f'data-name="{task}"' in page and f">{task}@1</a>" in page
            assert f"{task} exact_match <b>{acc[task][task]:.4g}</b>" in page
        heatmap = httpx.get(report["ui"]["expert-overlap heatmap"], timeout=30)
        assert heatmap.status_code == 200 and 'id="heatmap"' in heatmap.text
        assert 'src="data:image/svg+xml;base64,' in heatmap.text and "sum@1" in heatmap.text
        live = httpx.get(report["ui"]["live server state"], timeout=30)
        assert live.status_code == 200 and "sum@1" in live.text
    finally:
        res = CliRunner().invoke(cli, ["demo", "--stop"])
    assert res.exit_code == 0 and f"stopped the demo server at {report['url']}" in res.output
    with socket.socket() as sock:  # nothing left listening on the server's port
        assert sock.connect_ex(("127.0.0.1", report["port"])) != 0
