"""README's serve command, exactly as written, as a real process with no VLLM_* variables in its
environment (the product sizes its own KV cache and slots), in a folder holding `./base` and the
registry `reg`. Then: sets published after start are answered on demand; one that must make room
evicts the least recently used sets; a request for an evicted set is answered after a transparent
reload from the host cache, with its own answer; the eviction and reload show in /metrics, parsed
with prometheus_client's parser.

One server for the module (the engine starts once, compiled as a user's would be: ~1-2 min here).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
from pathlib import Path

import httpx
import pytest
from server_process import ServerProcess, free_port, serve_argv

pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STARTED = {"math": {0: [1, 2], 1: [3]}, "code": {0: [4], 1: [5, 6]}}  # registered before start
LATER = {"poetry": {0: [0, 6], 1: [0, 1]}, "law": {0: [3, 5, 7], 1: [2, 4, 7]}}  # published while serving
PROMPT = "The cat sat on"


def readme_serve_argv() -> list[str]:
    """The `expertlib serve` line of README's Serving section, split as a shell would."""
    section = re.search(r"^## Serving\n(.*?)^## ", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    assert section, "README has no Serving section"
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("expertlib serve "):
                return shlex.split(line)
    raise AssertionError("README's Serving section has no `expertlib serve` line")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from served_world import build

    from expertlib.registry import Registry

    cwd = tmp_path_factory.mktemp("readme-serve")
    build(cwd, {**STARTED, **LATER}, scale=None, publish=tuple(STARTED), registry="reg")
    paths = {name: cwd / f"{name}.safetensors" for name in {**STARTED, **LATER}}
    reg = Registry(cwd / "reg")

    argv = readme_serve_argv()
    assert argv[:3] == ["expertlib", "serve", "./base"] and "--all" in argv and "reg" in argv
    port = int(argv[argv.index("--port") + 1])
    if not _port_free(port):  # another program holds README's port here: the one change made
        port = free_port()
        argv[argv.index("--port") + 1] = str(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with ServerProcess(serve_argv(*argv[2:]), port, cwd / "server.log", env=env, cwd=cwd) as server:
        server.wait_ready(timeout_s=420)  # compiled, as a user's would be
        yield dict(url=server.url, reg=reg, paths=paths, cwd=cwd, log=cwd / "server.log")


def complete(server, model: str) -> str:
    r = httpx.post(
        server["url"] + "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def metrics(server) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server["url"] + "/metrics", timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def models(server) -> dict:
    body = httpx.get(server["url"] + "/v1/models", timeout=30).json()
    return {
        "resident": {c["id"] for c in body["data"]},
        "loadable": {x["id"]: x["state"] for x in body["loadable"]},
    }


def test_readme_command_starts_without_vllm_variables_and_sizes_itself(server):
    log = server["log"].read_text()
    assert "KV cache:" in log and "sized from the model" in log, log[-3000:]
    assert "expert slots: 5 per MoE layer" in log  # math and code need 3 per layer, +1 typical set (2)
    # the base by its folder name; auto: the set chosen from each prompt's routing
    assert models(server)["resident"] == {"base", "math@1", "code@1", "auto"}


def test_sets_answer_and_an_evicted_set_is_reloaded_transparently(server):
    first = {name: complete(server, name) for name in ("base", "math", "code", "base:math")}
    assert first["base:math"] == first["math"]
    assert len({first["base"], first["math"], first["code"]}) == 3  # each set gives its own answer
    for name in LATER:  # published while serving: answerable with no admin call
        server["reg"].publish(server["paths"][name], base=server["cwd"] / "base")
    assert models(server)["loadable"] == {"poetry@1": "disk", "law@1": "disk"}
    before = metrics(server)
    poetry = complete(server, "poetry")  # fits the headroom: nothing evicted
    law = complete(server, "law@latest")  # 3 experts per layer: math and code (LRU) make room
    assert len({poetry, law, first["math"]}) == 3
    now = models(server)
    assert {"poetry@1", "law@1"} <= now["resident"] and "math@1" not in now["resident"]
    assert now["loadable"]["math@1"] == "host"  # evicted, kept in host memory
    mid = metrics(server)
    assert value(mid, "expertlib_set_evictions_total", model="math@1") == 1 + value(
        before, "expertlib_set_evictions_total", model="math@1"
    )
    assert value(mid, "expertlib_set_residency", model="math@1", where="host") == 1
    assert complete(server, "math") == first["math"]  # reloaded on demand, same answer
    after = metrics(server)
    assert value(after, "expertlib_set_loads_total", model="math@1", source="host") == 1
    assert value(after, "expertlib_set_residency", model="math@1", where="slots") == 1
    assert value(after, "expertlib_set_load_seconds_total", model="math@1") > 0
    assert value(after, "expertlib_requests_total", model="math@1", endpoint="completions", status="200") >= 2
    assert value(after, "expertlib_completion_tokens_total", model="math@1") > 0
    assert value(after, "expertlib_request_latency_seconds_count", model="math@1") >= 2
    assert value(after, "expertlib_set_load_latency_seconds_count", model="math@1") == 2


def test_a_start_that_does_not_fit_memory_fails_with_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """Refused before vLLM allocates anything: the line names the numbers and the flag to change."""
    from click.testing import CliRunner

    # other test modules set vLLM's own KV-cache variable for the whole session; where it is set it
    # wins over the sizing (and this server would start and serve forever), so run as a user would
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    from expertlib.cli.main import cli

    argv = ["serve", str(tiny_model_dir("qwen2_moe")), "--kv-cache-memory", "64KiB", "--port", "0"]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    error = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(error) == 1
    assert "is less than one 512-token sequence needs" in error[0] and "64.0 KiB" in error[0]
    assert "hint: pass --kv-cache-memory" in res.output
