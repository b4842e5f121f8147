"""`--metrics-open CIDR`: /metrics answers without a key to clients connecting from those networks,
and nothing else opens. Real HTTP against a real port: the client binds 127.0.0.2 (inside the open
network) or 127.0.0.1 (outside) on the loopback interface, so the server sees the address the
connection really comes from; the IPv6 cases set the ASGI client tuple the way uvicorn does.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner
from server_process import free_port
from test_server_http import FakeEngine, ServerThread

from expertlib.cli.main import cli
from expertlib.cli.options import help_text
from expertlib.server import ServerSettings, create_app
from expertlib.server.replicas import call_app

API_KEY, ADMIN_KEY, METRICS_KEY = "open-api", "open-admin", "open-metrics"
INSIDE, OUTSIDE = "127.0.0.2", "127.0.0.1"


def keyed(**settings) -> ServerSettings:
    return ServerSettings(
        base="tiny-base", api_key=API_KEY, admin_key=ADMIN_KEY, metrics_key=METRICS_KEY, **settings
    )


@pytest.fixture(scope="module")
def server():
    settings = keyed(metrics_open=[INSIDE + "/32"])
    engine = FakeEngine()
    port = free_port()
    with ServerThread(create_app(settings, engine_factory=lambda _s: engine), port) as thread:
        thread.wait_ready()
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}")


def client_from(address: str) -> httpx.Client:
    """An HTTP client whose connections come from `address` (a loopback address of this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_metrics_answer_without_a_key_inside_the_network_only(server):
    with client_from(INSIDE) as inside, client_from(OUTSIDE) as outside:
        r = inside.get(server.url + "/metrics")
        assert r.status_code == 200, r.text
        assert "expertlib_ready" in r.text
        assert outside.get(server.url + "/metrics").status_code == 401
        keyed_scrape = outside.get(
            server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}
        )
        assert keyed_scrape.status_code == 200  # the scrape with a bearer token works as before
        wrong = outside.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        assert wrong.status_code == 401


#: (method, path, body) of every other kind of route: each must answer the open network as it
#: answers anyone without a key
OTHER_ROUTES = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "tiny-base", "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": "tiny-base", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/tokenize", {"model": "tiny-base", "prompt": "hi"}),
    ("GET", "/admin/status", None),
    ("POST", "/admin/sets/load", {"name": "math"}),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
    ("GET", "/ui/live", None),
    ("GET", "/metrics/", None),
    ("GET", "/no-such-route", None),
]


@pytest.mark.parametrize("method,path,body", OTHER_ROUTES, ids=[p for _, p, _ in OTHER_ROUTES])
def test_the_open_network_gets_no_other_route_without_its_key(server, method, path, body):
    with client_from(INSIDE) as inside, client_from(OUTSIDE) as outside:
        got = inside.request(method, server.url + path, json=body)
        assert got.status_code in (401, 403), (got.status_code, got.text[:200])
        assert got.status_code == outside.request(method, server.url + path, json=body).status_code


def test_the_api_and_admin_keys_still_work_from_the_open_network(server):
    with client_from(INSIDE) as inside:
        models = inside.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-base"
        status = inside.get(server.url + "/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert status.status_code == 200, status.text


@pytest.mark.parametrize(
    "header", [{"X-Forwarded-For": INSIDE}, {"X-Forwarded-For": "10.9.9.9"}, {"Forwarded": f"for={INSIDE}"}]
)
def test_a_forwarded_request_needs_the_key_even_from_inside(server, header):
    """A proxy's header means the connection's address is the proxy's, not the client's."""
    with client_from(INSIDE) as inside:
        assert inside.get(server.url + "/metrics", headers=header).status_code == 401
        keyed_scrape = inside.get(
            server.url + "/metrics", headers={**header, "Authorization": f"Bearer {METRICS_KEY}"}
        )
        assert keyed_scrape.status_code == 200


def test_x_forwarded_for_cannot_claim_an_open_address(server):
    """uvicorn takes the client address from X-Forwarded-For when the connection comes from
    127.0.0.1 (its default trusted proxy): an outside client naming an inside address stays outside."""
    with client_from(OUTSIDE) as outside:
        r = outside.get(server.url + "/metrics", headers={"X-Forwarded-For": INSIDE})
        assert r.status_code == 401


def asgi_status(app, client: tuple[str, int] | None, path: str = "/metrics") -> int:
    """The status `app` answers GET `path` with, called with the ASGI `client` a server would give."""
    transport = httpx.ASGITransport(app=app, client=client) if client else httpx.ASGITransport(app=app)

    async def get() -> int:
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as c:
            return (await c.get(path)).status_code

    return asyncio.run(get())


@pytest.mark.parametrize(
    "host,status",
    [
        ("10.1.2.3", 200),
        ("::ffff:10.1.2.3", 200),  # an IPv4 client as a dual-stack (IPv6) socket sees it
        ("fd12:3456::5", 200),
        ("11.0.0.1", 401),
        ("::ffff:11.0.0.1", 401),
        ("fe80::1", 401),
        ("::1", 401),
        ("testclient", 401),  # not an address: never open
    ],
)
def test_which_addresses_are_inside(host, status):
    app = create_app(keyed(metrics_open=["10.0.0.0/8", "fd00::/8"]), engine_factory=lambda _s: FakeEngine())
    assert asgi_status(app, (host, 40000)) == status
    assert asgi_status(app, (host, 40000), "/v1/models") == 401


def test_without_metrics_open_every_client_needs_the_key():
    app = create_app(keyed(), engine_factory=lambda _s: FakeEngine())
    assert asgi_status(app, ("10.1.2.3", 40000)) == 401
    assert asgi_status(app, ("127.0.0.1", 40000)) == 401


def test_a_replica_behind_the_ray_router_never_opens_metrics():
    """The router calls a replica's app in process, with no client address: nothing is open there."""
    app = create_app(keyed(metrics_open=["127.0.0.0/8", "::1/128"]), engine_factory=lambda _s: FakeEngine())

    async def status() -> int:
        async for item in call_app(app, "GET", "/metrics", b"", [], b""):
            return item[0]
        raise AssertionError("no answer")

    assert asyncio.run(status()) == 401


def test_networks_are_checked_and_written_canonically():
    settings = keyed(metrics_open=["10.0.0.0/8", "127.0.0.1", " 192.168.1.0/24 ", "FD00::/8"])
    assert settings.metrics_open == ["10.0.0.0/8", "127.0.0.1/32", "192.168.1.0/24", "fd00::/8"]


@pytest.mark.parametrize(
    "value,says",
    [
        ("10.0.0.0/33", "is not a network"),
        ("private", "is not a network"),
        ("", "is not a network"),
        ("10.0.0.1/8", "host bits set; write the network, 10.0.0.0/8"),
        ("0.0.0.0/0", "to every client"),
        ("::/0", "to every client"),
        ("::/1", "to every client"),  # holds every IPv4 client as ::ffff:a.b.c.d
        ("::ffff:0:0/96", "to every client"),
    ],
)
def test_bad_networks_are_refused_with_what_to_write(value, says, monkeypatch):
    from expertlib import server as server_pkg

    monkeypatch.setattr(server_pkg, "serve", lambda s: pytest.fail("the server started"))
    r = CliRunner().invoke(cli, ["serve", "./base", "--metrics-key", "k", "--metrics-open", value])
    assert r.exit_code == 2, r.output
    assert "--metrics-open" in r.output and says in r.output


def test_the_option_comes_from_the_settings_field(monkeypatch):
    from expertlib import server as server_pkg

    opts = {p.name: p for p in cli.commands["serve"].params}
    option = opts["metrics_open"]
    assert option.opts == ["--metrics-open"] and option.multiple
    assert option.help.startswith(help_text(ServerSettings, "metrics_open").rstrip("."))
    seen = []
    monkeypatch.setattr(server_pkg, "serve", seen.append)
    r = CliRunner().invoke(
        cli,
        ["serve", "./base", "--metrics-key", "k", "--metrics-open", "10.0.0.0/8", "--metrics-open", "::1"],
    )
    assert r.exit_code == 0, r.output
    assert seen[0].metrics_open == ["10.0.0.0/8", "::1/128"]
    assert "warning" not in r.output


def test_a_public_network_warns_and_replicas_refuse(monkeypatch):
    from expertlib import server as server_pkg
    from expertlib.server import replicas

    seen = []
    monkeypatch.setattr(server_pkg, "serve", seen.append)
    r = CliRunner().invoke(cli, ["serve", "./base", "--metrics-open", "203.0.113.0/24"])
    assert r.exit_code == 0 and len(seen) == 1
    assert "warning: --metrics-open 203.0.113.0/24 holds public addresses" in r.output
    monkeypatch.setattr(replicas, "serve_replicated", lambda *a, **kw: pytest.fail("replicas started"))
    r = CliRunner().invoke(cli, ["serve", "./base", "--replicas", "2", "--metrics-open", "10.0.0.0/8"])
    assert r.exit_code == 2 and "--metrics-open needs a single engine" in r.output
