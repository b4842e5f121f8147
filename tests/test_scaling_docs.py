"""docs/SCALING.md is tested: its Prometheus scrape config (bearer token from a credentials file) is
read as Prometheus reads it and used against a real server with a metrics key; the per-replica series
it shows are the ones `render_replicas` writes; `serve --gpus-per-replica` reaches Ray's actor options.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port
from test_server_http import FakeEngine, ServerThread

from expertlib.server import ServerSettings, create_app
from expertlib.server.metrics import render_replicas

DOC = Path(__file__).resolve().parents[1] / "docs" / "SCALING.md"
KEY = "scrape-secret"


def blocks(lang: str) -> list[str]:
    """The fenced blocks of docs/SCALING.md whose info string is `lang` ("" for a bare fence)."""
    out: list[str] = []
    current: list[str] | None = None
    keep = False
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, keep = [], line[3:].strip() == lang
            else:
                if keep:
                    out.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return out


def scrape_config() -> dict:
    found = [yaml.safe_load(b) for b in blocks("yaml") if "scrape_configs" in b]
    assert len(found) == 1, "docs/SCALING.md should hold one Prometheus scrape config"
    return found[0]["scrape_configs"][0]


def prometheus_get(job: dict, target: str) -> httpx.Response:
    """A scrape the way Prometheus makes it: GET http://TARGET/metrics (metrics_path), the
    `authorization` block as the Authorization header (credentials_file read at scrape time)."""
    auth = job.get("authorization")
    headers = {}
    if auth is not None:
        credentials = auth.get("credentials") or Path(auth["credentials_file"]).read_text().strip()
        headers["Authorization"] = f"{auth.get('type', 'Bearer')} {credentials}"
    return httpx.get(f"http://{target}{job.get('metrics_path', '/metrics')}", headers=headers, timeout=30)


def test_the_documented_scrape_config_reads_a_keyed_server(tmp_path):
    job = scrape_config()
    key_file = tmp_path / "expertlib-metrics-key"
    key_file.write_text(KEY + "\n")
    job["authorization"]["credentials_file"] = str(key_file)  # the doc's path, on this machine
    port = free_port()
    engine = FakeEngine()
    settings = ServerSettings(base="tiny-base", api_key="inference-key", metrics_key=KEY)
    with ServerThread(create_app(settings, engine_factory=lambda _s: engine), port):
        (target,) = job["static_configs"][0]["targets"]
        target = target.rsplit(":", 1)[0] + f":{port}"  # the doc's host, this test's port
        r = prometheus_get(job, target)
        assert r.status_code == 200, r.text
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert "expertlib_requests" in names and "expertlib_ready" in names
        assert (
            prometheus_get({k: v for k, v in job.items() if k != "authorization"}, target).status_code == 401
        )
        wrong = {**job, "authorization": {"type": "Bearer", "credentials": "inference-key"}}
        assert prometheus_get(wrong, target).status_code == 401  # the inference key does not read it


def test_the_per_replica_series_are_the_documented_ones():
    text = render_replicas(
        {
            "r1": {
                "requests": {"math@1": {"yes": 412, "no": 1}},
                "sets": ["math@1", "code@1"],
                "loads": 3,
                "evictions": 1,
            },
            "r2": {
                "requests": {"code@1": {"yes": 5, "no": 2}},
                "sets": ["code@1"],
                "loads": 2,
                "evictions": 0,
            },
        }
    ).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    documented = [
        line for b in blocks("") for line in b.splitlines() if line.startswith("expertlib_replica_")
    ]
    assert len(documented) == 5
    for line in documented:
        series, value = line.rsplit(None, 1)
        name, _, labels = series.partition("{")
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert samples[(name, tuple(sorted(parsed.items())))] == float(value), line
    hits = sum(
        v
        for (n, lab), v in samples.items()
        if n == "expertlib_replica_requests_total" and ("resident", "yes") in lab
    )
    total = sum(v for (n, _), v in samples.items() if n == "expertlib_replica_requests_total")
    assert (hits, total) == (417, 420)


def test_gpus_per_replica_reaches_ray_and_needs_replicas(monkeypatch):
    from expertlib.cli.main import cli
    from expertlib.server import replicas

    seen = {}
    monkeypatch.setattr(replicas, "serve_replicated", lambda s, n, **kw: seen.update(n=n, **kw))
    r = CliRunner().invoke(cli, ["serve", "./base", "--replicas", "3", "--gpus-per-replica", "1"])
    assert r.exit_code == 0, r.output
    assert seen == {"n": 3, "ray_address": None, "replica_options": {"num_cpus": 0, "num_gpus": 1.0}}
    r = CliRunner().invoke(cli, ["serve", "./base", "--gpus-per-replica", "1"])
    assert r.exit_code != 0 and "need --replicas" in r.output
