"""The web view at /ui: keys and the login cookie, escaping of every user string, what each page shows
against the registry and /metrics (in process), and a real headless Chromium clicking through a running
`expertlib serve` (Playwright driving the distribution's Chromium; `scripts/install_browser.sh`)."""

from __future__ import annotations

import html
import os
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from prometheus_client.parser import text_string_to_metric_families

from expertlib.registry import Registry
from expertlib.registry.evals import make_records, retention_records
from expertlib.registry.testing import make_expert_set, tiny_base_identity
from expertlib.server import ServerSettings, create_app
from expertlib.server.registry_app import registry_app
from expertlib.server.ui import COOKIE, session_token

TOKEN = "reg-token"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def reg(tmp_path):
    reg = Registry(tmp_path / "reg")
    base = tiny_base_identity()
    reg.publish(make_expert_set("sum", base, {0: [1, 2], 1: [3]}, seed=1), tags=["stable"])
    reg.publish(make_expert_set("sum", base, {0: [2, 4], 1: [3]}, seed=2))
    reg.publish(make_expert_set(HOSTILE, base, {1: [0]}, seed=3, description=HOSTILE), task="fill")
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.5}}))
    reg.record_evals("sum@2", make_records({"sum": {"exact_match": 0.96}}))
    reg.record_evals("sum@2", retention_records({"mean_general_mass": 0.0123, "max_general_mass": 0.04}))
    return reg


def logged_in(client: TestClient, key: str, next: str = "/ui"):
    return client.post("/ui/login", data={"key": key, "next": next}, follow_redirects=False)


def test_no_page_without_the_key_and_a_login_cookie_that_is_not_the_key(reg):
    client = TestClient(registry_app(reg, token=TOKEN))
    for path in ("/ui", "/ui/sets/sum@1", "/ui/diff?ref=sum@1&ref=sum@2"):
        r = client.get(path)
        assert r.status_code == 401 and 'name="key"' in r.text and "sum@1" not in r.text.split("next")[0]
        assert "exact_match" not in r.text
    assert client.get("/ui", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/ui", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    bad = logged_in(client, "wrong")
    assert (
        bad.status_code == 401 and "not valid" in bad.text and COOKIE not in bad.headers.get("set-cookie", "")
    )
    ok = logged_in(client, TOKEN, next="/ui/sets/sum@2")
    assert ok.status_code == 303 and ok.headers["location"] == "/ui/sets/sum@2"
    cookie = ok.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "Path=/ui" in cookie
    assert TOKEN not in cookie and session_token(TOKEN) in cookie
    assert client.get("/ui/sets/sum@2").status_code == 200  # the cookie, no header
    assert client.get("/v1/registry/entries").status_code == 401  # the cookie opens the web view only

    assert logged_in(client, TOKEN, next="//evil.example/x").headers["location"] == "/ui"
    client.post("/ui/logout")
    assert client.get("/ui").status_code == 401


def test_every_user_string_is_escaped(reg):
    client = TestClient(registry_app(reg))  # no token: open
    pages = [client.get("/ui"), client.get("/ui/sets/fill@1"), client.get("/ui/diff?ref=fill@1&ref=sum@1")]
    for page in pages:
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
    assert str(escape(HOSTILE)) in pages[0].text  # the description, escaped on the list
    assert pages[1].text.count("&lt;script&gt;") >= 2  # manifest task + description (+ manifest JSON)
    assert "&lt;script&gt;" in pages[2].text  # the diff's set table shows the manifest task
    # a hostile reference in the URL comes back escaped in the error page
    bad = client.get("/ui/sets/" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert bad.status_code in (400, 404) and "<script>alert(1)" not in bad.text


def test_set_page_shows_provenance_scores_of_every_version_and_links_the_diff(reg):
    client = TestClient(registry_app(reg))
    listing = client.get("/ui").text
    assert 'href="/ui/sets/sum%402"' in listing and "stable" in listing and "0.96" in listing
    page = client.get("/ui/sets/sum@2").text
    scores = page[page.index('id="scores"') : page.index("</table>", page.index('id="scores"'))]
    assert "sum@1" in scores and "0.5" in scores and "0.96" in scores  # versions side by side
    assert "mean_general_mass 0.0123" in page  # retention risk, recorded
    assert reg.show("sum@2").base.config_digest in page
    link = re.search(r'id="diff-previous" href="([^"]+)"', page).group(1)
    diff = client.get(html.unescape(link)).text
    report = reg.diff(["sum@1", "sum@2"])
    pairs = diff[diff.index('id="pairs"') :]
    assert f"{report.pairs[0].jaccard:.4f}" in pairs and f"{report.pairs[0].mean_rel_diff:.4f}" in pairs
    assert 'src="data:image/svg+xml;base64,' in diff  # the heatmap of plot_diff, as SVG
    one = client.get("/ui/diff?ref=sum@1")
    assert one.status_code == 400 and "choose 2" in one.text


class FakeEngine:
    """What the live page reads from an engine: status (slots, history) and the loaded sets."""

    def status(self):
        history = {
            "sum@1": {"loads": 3, "cache_loads": 1, "evictions": 2, "residency": "host", "load_seconds": 0.5}
        }
        return {
            "slots_used": {"0": 3, "1": 5},
            "slots_per_layer": 8,
            "sets": {"sum@2": {}},
            "history": history,
        }

    def loaded_sets(self):
        return ["sum@2"]

    def get_tokenizer(self):
        from expertlib.testing import make_tokenizer

        return make_tokenizer()

    def shutdown(self):
        pass


def test_serve_app_pages_follow_the_route_rules_and_live_equals_metrics(reg):
    settings = ServerSettings(
        base="tiny-base",
        registry=str(reg.root),
        api_key="api",
        admin_key="admin",
        metrics_key="metrics",
        max_model_len=64,
    )
    app = create_app(settings, engine_factory=lambda s: FakeEngine(), registry=reg)
    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        state = app.state.server
        state.metrics.requests.labels(model="sum@2", endpoint="completions", status="200").inc(7)
        state.metrics.requests.labels(model="sum@2", endpoint="chat", status="400").inc(2)
        state.metrics.completion_tokens.labels(model="sum@2").inc(41)

        def get(path, key):
            return client.get(path, headers={"Authorization": f"Bearer {key}"})

        assert get("/ui", "api").status_code == 200 and get("/ui", "metrics").status_code == 401
        assert get("/ui/live", "api").status_code == 401 and get("/ui/live", "admin").status_code == 200
        assert client.get("/ui/live").status_code == 401

        live = get("/ui/live", "metrics").text
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(get("/metrics", "metrics").text)
            for s in f.samples
        }

        def cell(name, col):
            row = re.search(rf'<tr data-set="{re.escape(name)}">(.*?)</tr>', live, re.S).group(1)
            return int(re.search(rf'data-col="{col}">(\d+)', row).group(1))

        requests = sum(
            v
            for (n, lab), v in metrics.items()
            if n == "expertlib_requests_total" and ("model", "sum@2") in lab
        )
        assert cell("sum@2", "requests") == requests == 9
        assert cell("sum@2", "completion_tokens") == 41
        loads = sum(
            v
            for (n, lab), v in metrics.items()
            if n == "expertlib_set_loads_total" and ("model", "sum@1") in lab
        )
        assert cell("sum@1", "loads") == loads == 3
        assert (
            cell("sum@1", "evictions")
            == metrics[("expertlib_set_evictions_total", (("model", "sum@1"),))]
            == 2
        )
        assert (
            f"{int(metrics[('expertlib_slots_used', ())])} / {int(metrics[('expertlib_slots_total', ())])}"
            in live
        )
        assert "5 / 8" in live


# --- a real browser against a real server ----------------------------------------------------------

CHROMIUM = os.environ.get("EXPERTLIB_CHROMIUM", "/usr/bin/chromium")
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def artefacts(tmp_path: Path) -> Path:
    """Where screenshots go: $EXPERTLIB_TEST_ARTIFACTS (CI keeps it), else the test's tmp folder."""
    out = Path(os.environ.get("EXPERTLIB_TEST_ARTIFACTS") or tmp_path) / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def playwright_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh as root (make test does)")
    return sync_api


def click_through(sync_api, url: str, reg: Registry, a: str, b: str, requests: dict[str, int], shots: Path):
    """Log in with the admin key, click from the list to set `a`, compare `a` and `b`, open the live
    state; check names against the registry and numbers against /metrics; screenshots at 1280 and 390 px."""
    import httpx

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(url + "/ui")
        assert page.locator("#key").is_visible() and page.locator("a.set-link").count() == 0
        page.fill("#key", "admin-key")
        page.click("#login")
        page.wait_for_url(url + "/ui")
        names = page.locator("a.set-link").all_inner_texts()
        assert sorted(names) == sorted(f"{e.name}@{e.version}" for e in reg.list())
        assert "0.75" in page.locator(f'.set-group[data-name="{a.split("@")[0]}"]').inner_text()
        page.screenshot(path=str(shots / "sets-1280.png"), full_page=True)

        page.click(f"a.set-link:text-is('{a}')")
        assert page.locator("#set-title").inner_text() == a
        entry = reg.show(a)
        assert entry.digest in page.locator("#summary").inner_text()
        assert page.locator("#experts tr").count() == len(entry.manifest.experts) + 1
        page.screenshot(path=str(shots / "set-1280.png"), full_page=True)

        page.goto(url + "/ui")  # tick two sets, compare
        page.check(f'input[value="{a}"]')
        page.check(f'input[value="{b}"]')
        page.click("#compare")
        labels = page.locator("#diff-title").inner_text().split(" vs ")
        assert sorted(labels) == sorted([a, b])  # in the list's order
        report = reg.diff(labels)
        assert f"{report.pairs[0].jaccard:.4f}" in page.locator("#pairs").inner_text()
        assert page.locator("#heatmap").evaluate("img => img.naturalWidth") > 100  # the SVG drew
        page.screenshot(path=str(shots / "diff-1280.png"), full_page=True)

        page.click("#nav-live")
        text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer metrics-key"}).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        for asked, expected in requests.items():  # a set asked for by name is counted under name@version
            counts: dict[str, float] = {}
            for s in samples:
                model = s.labels.get("model", "")
                if s.name == "expertlib_requests_total" and model.split("@")[0] == asked.split("@")[0]:
                    counts[model] = counts.get(model, 0) + s.value
            (name,) = counts
            shown = page.locator(f'tr[data-set="{name}"] td[data-col="requests"]').inner_text()
            assert int(shown) == counts[name] == expected
        loaded = next(s.value for s in samples if s.name == "expertlib_sets_loaded")
        assert int(page.locator("#sets-loaded").inner_text()) == loaded
        page.screenshot(path=str(shots / "live-1280.png"), full_page=True)

        phone = context.new_page()  # the same cookie jar
        phone.set_viewport_size({"width": 390, "height": 844})
        for path in ("/ui", f"/ui/sets/{a}", f"/ui/diff?ref={a}&ref={b}", "/ui/live"):
            phone.goto(url + path)
            assert phone.locator("#key").count() == 0  # still logged in
            overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{path} is {overflow} px wider than a phone"
            phone.screenshot(path=str(shots / (path.strip("/").split("?")[0].replace("/", "-") + "-390.png")))
        browser.close()


KEYS = {"api_key": "api-key", "admin_key": "admin-key", "metrics_key": "metrics-key"}


@pytest.mark.slow
def test_browser_on_a_server_with_a_stand_in_engine(reg, tmp_path):
    """The pages through Chromium on a real port, the engine a stand-in (seconds, no vLLM)."""
    from server_process import ServerThread

    sync_api = playwright_or_skip()
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.75}}))
    settings = ServerSettings(base="tiny-base", registry=str(reg.root), max_model_len=64, **KEYS)
    app = create_app(settings, engine_factory=lambda s: FakeEngine(), registry=reg)
    with ServerThread(app) as server:
        url = server.url
        server.wait_ready()
        app.state.server.metrics.requests.labels(model="sum@2", endpoint="completions", status="200").inc(3)
        click_through(sync_api, url, reg, "sum@1", "sum@2", {"sum@2": 3}, artefacts(tmp_path))


@pytest.mark.vllm
@pytest.mark.slow
def test_browser_on_expertlib_serve(tmp_path):
    """The same through a real `expertlib serve` (vLLM engine), after real requests for each set."""
    import httpx
    import served_world

    sync_api = playwright_or_skip()
    base_dir, _ = served_world.build(tmp_path)
    reg = Registry(tmp_path / "registry")
    reg.record_evals("alpha", make_records({"alpha": {"exact_match": 0.75}}))
    keys = [x for k, v in KEYS.items() for x in ("--" + k.replace("_", "-"), v)]
    with served_world.serve(tmp_path, base_dir, *keys) as url:
        for model in ("alpha", "alpha", "beta"):
            r = httpx.post(
                url + "/v1/completions",
                json={"model": model, "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": "Bearer api-key"},
                timeout=120,
            )
            assert r.status_code == 200, r.text
        click_through(sync_api, url, reg, "alpha@1", "beta@1", {"alpha": 2, "beta": 1}, artefacts(tmp_path))
