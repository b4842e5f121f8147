"""Security, second pass: the server-side cases of the attack report, each reproduced over HTTP against
the real app on a real port (over the engine double of test_server_http; the concurrent large-prompt
load against vLLM's engine is in test_security_stress.py). One test per case, named after it:

  large prompts bounded before tokenizing (character cap, bounded tokenizer pool, admission first)
  /tokenize and /detokenize check the key before the body      top_k=2^70, logit_bias NaN / 1e308
  a deeply nested JSON schema in response_format               /tokenize with a lone surrogate
  JSON bodies nested past the cap                               GET /v1/models during a registry lock
  admin load of another file under a resident name              on-demand load while every set is pinned
"""

from __future__ import annotations

import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from test_server_http import FakeEngine, ServerThread

from expertlib.identity import BaseIdentity
from expertlib.moe import ExpertWeights
from expertlib.patch import ExpertSet
from expertlib.registry import Registry
from expertlib.server import ServerSettings, create_app
from expertlib.slots.pool import SlotPool

API_KEY, ADMIN_KEY = "sk-attack", "sk-attack-admin"
CTX = 64  # the engine double's context: prompts over CTX x 32 characters are refused untokenized
LONG = 20_000  # characters from which the tokenizer below is slow, like a real one on megabytes


def patch_file(path, task: str, fill: float = 0.0, experts=((0, 1),)):
    """A real (tiny) expert-set file; `fill` makes sets of one task differ."""
    weights = {
        k: ExpertWeights(
            gate=torch.full((2, 4), fill), up=torch.full((2, 4), fill), down=torch.full((4, 2), fill)
        )
        for k in experts
    }
    base = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny-base")
    digests = {k: "sha256:" + "1" * 64 for k in experts}
    return ExpertSet.build(task=task, base=base, experts=weights, base_digests=digests).save(path)


class SlowTokenizer:
    """The double's tokenizer, recording the length of every text it is given and taking a second
    (without the GIL, as a real one does) on texts of LONG characters or more."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[int] = []

    def encode(self, text, **kw):
        if isinstance(text, str):
            self.seen.append(len(text))
            if len(text) >= LONG:
                time.sleep(1.0)
                return self.inner.encode(text[:10], **kw)
        return self.inner.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def start(settings: ServerSettings, engine) -> tuple[ServerThread, str]:
    async def factory(_settings):
        return engine

    thread = ServerThread(create_app(settings, engine_factory=factory)).__enter__()
    thread.wait_ready()
    return thread, thread.url


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-server")
    reg = Registry(root / "registry")
    reg.publish(patch_file(root / "math.safetensors", "math"))
    engine = FakeEngine(delay=0.01)
    engine.tokenizer = SlowTokenizer(engine.tokenizer)
    settings = ServerSettings(
        base="tiny-base",
        registry=str(reg.root),
        expert_sets=["math"],
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        max_queue=32,
        max_model_len=CTX,
        max_prompt_chars=100_000,
        max_body_bytes=2**20,
    )
    thread, url = start(settings, engine)
    try:
        # one client for every request (thread-safe): a fresh one per request costs the test's own
        # threads more time (TLS context, connection) than the server under test takes to answer
        http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=64, keepalive_expiry=2))
        server = SimpleNamespace(url=url, engine=engine, registry=reg, root=root, http=http)
        # the first completion imports vLLM's request models (seconds): not inside a timed test
        assert post(server, "/v1/completions", {"model": "math", "prompt": "hi", "max_tokens": 1}).is_success
        yield server
        http.close()
    finally:
        thread.__exit__(None, None, None)


def post(server, path, body, key=API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (str, bytes)):
        headers["Content-Type"] = "application/json"
        return server.http.post(server.url + path, content=body, headers=headers, **kw)
    return server.http.post(server.url + path, json=body, headers=headers, **kw)


def one_line_error(r: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of `r`: a one-line message (and at most its hint line), no traceback."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    first, *rest = err["message"].splitlines()
    assert first and all(line.startswith("  hint: ") for line in rest), err["message"]
    assert len(rest) <= 1 and "Traceback" not in err["message"], err["message"]
    return err


# --- bounded work before admission ----------------------------------------------------------------


def test_large_prompt_refused_before_tokenizing(server):
    """A prompt too long for any context is refused by its length in characters: the tokenizer
    never sees it (before, it was tokenized first: seconds and gigabytes for megabyte prompts)."""
    server.engine.tokenizer.seen.clear()
    for path, body in [
        ("/v1/completions", {"model": "math", "prompt": "a" * 200_000, "max_tokens": 2}),
        ("/v1/completions", {"model": "math", "prompt": ["hi", "b" * 200_000], "max_tokens": 2}),
        ("/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "c" * 200_000}]}),
        ("/tokenize", {"prompt": "d" * 200_000}),
    ]:
        err = one_line_error(post(server, path, body), 400)
        assert err["code"] == "context_length_exceeded" and "characters" in err["message"], err
    assert max(server.engine.tokenizer.seen, default=0) < 200_000
    from expertlib.server.limits import CHARS_PER_TOKEN, prompt_char_limit

    assert prompt_char_limit(CTX) == CTX * CHARS_PER_TOKEN  # the default cap: the context x 32


def test_concurrent_large_prompts_do_not_delay_a_short_request(server):
    """12 long prompts at once (each a second of tokenizing) and then a 2-token request: the short
    one answers at once (before: it waited for a tokenizer thread behind the long ones), the long
    ones beyond the tokenizer pool's queue get 429 with Retry-After."""
    body = {"model": "math", "prompt": "x" * (LONG + 10), "max_tokens": 2}
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(post, server, "/v1/completions", body) for _ in range(12)]
        time.sleep(0.3)  # the long prompts are being tokenized or queued now
        start = time.perf_counter()
        r = post(server, "/v1/completions", {"model": "math", "prompt": "hi", "max_tokens": 2})
        took = time.perf_counter() - start
        answers = [f.result() for f in futures]
    assert r.status_code == 200, r.text
    assert took < 0.8, f"a 2-token request waited {took:.2f} s behind long prompts"
    assert {a.status_code for a in answers} <= {200, 429}
    assert any(a.status_code == 200 for a in answers)
    for a in answers:
        if a.status_code == 429:
            assert a.headers["retry-after"].isdigit()


def test_full_queue_refuses_a_large_prompt_before_tokenizing(server):
    """Admission comes first: with the queue full, a long prompt gets 429 untokenized (before, it was
    tokenized and then refused)."""
    hold = {"model": "math", "prompt": ["a", "b"], "n": 16, "max_tokens": 60, "temperature": 1.0}
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(post, server, "/v1/completions", hold)  # 32 of 32 sequences
        time.sleep(0.3)
        server.engine.tokenizer.seen.clear()
        r = post(server, "/v1/completions", {"model": "math", "prompt": "y" * (LONG + 1), "max_tokens": 2})
        assert holding.result().status_code == 200
    one_line_error(r, 429)
    assert r.headers["retry-after"].isdigit()
    assert LONG + 1 not in server.engine.tokenizer.seen


# --- keys before bodies -----------------------------------------------------------------------------


def _answer_to_headers(server, path: str, length: int) -> int:
    """POST `path` without a key, announcing `length` body bytes and sending a few: the status of the
    answer, which must come without the rest of the body."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head.encode() + b'{"prompt": "')
        data = s.recv(4096)  # before the fix: no answer until the whole body came (a timeout here)
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/v1/completions", "/no/such/route"])
def test_tokenize_and_detokenize_check_the_key_before_the_body(server, path):
    assert _answer_to_headers(server, path, 900_000) == 401


# --- parameters that reached the engine or a recursion --------------------------------------------------


@pytest.mark.parametrize("top_k", [2**70, 2**31])
def test_top_k_2_70_is_400(server, top_k):
    r = post(server, "/v1/completions", {"model": "math", "prompt": "hi", "max_tokens": 2, "top_k": top_k})
    err = one_line_error(r, 400)
    assert err["param"] == "top_k"
    ok = post(
        server, "/v1/completions", {"model": "math", "prompt": "hi", "max_tokens": 2, "top_k": 2**31 - 1}
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e308", "-101"])
def test_logit_bias_nan_or_1e308_is_400(server, value):
    body = '{"model": "math", "prompt": "hi", "max_tokens": 2, "logit_bias": {"5": ' + value + "}}"
    err = one_line_error(post(server, "/v1/completions", body), 400)
    assert err["param"].startswith("logit_bias")
    ok = {"model": "math", "prompt": "hi", "max_tokens": 2, "logit_bias": {"5": -100, "6": 100}}
    assert post(server, "/v1/completions", ok).status_code == 200


def _nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deeply_nested_json_schema_in_response_format_is_400(server):
    schema = _nested_schema(400)  # 800 levels of JSON: a RecursionError in the schema check (500)
    body = {
        "model": "math",
        "prompt": "hi",
        "max_tokens": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    err = one_line_error(post(server, "/v1/completions", body), 400)
    assert "nest" in err["message"]


def test_tokenize_with_a_lone_surrogate_is_400(server):
    for body in ('{"prompt": "a\\ud800b"}', '{"messages": [{"role": "user", "content": "\\udfff"}]}'):
        err = one_line_error(post(server, "/tokenize", body), 400)
        assert "surrogate" in err["message"]
    assert post(server, "/tokenize", {"prompt": "ab"}).json()["count"] == 2


def test_json_body_nested_past_the_cap_is_400(server):
    """Depth is checked on the raw bytes, before any parse: even a field the server ignores."""
    deep = "[" * 200 + "]" * 200
    body = '{"model": "math", "prompt": "hi", "max_tokens": 2, "ignored": ' + deep + "}"
    err = one_line_error(post(server, "/v1/completions", body), 400)
    assert err["code"] == "json_too_deep"
    # brackets inside strings (escaped quotes and backslashes too) are text, not nesting
    nested: list = []
    for _ in range(60):
        nested = [nested]
    text = '[[[[\\"{{{{ \\\\" ' * 2
    fine = {"model": "math", "prompt": text, "max_tokens": 2, "ignored": nested}
    r = post(server, "/v1/completions", fine)
    assert r.status_code == 200, r.text
    one_line_error(post(server, "/admin/sets/load", '{"name": ' + deep + "}", key=ADMIN_KEY), 400)


# --- the registry on the event loop -------------------------------------------------------------------


def test_models_listing_during_a_registry_lock_keeps_health_fast(server):
    """10 GET /v1/models while another process holds the registry index: each answers 503 with
    Retry-After after the busy timeout, and /health answers meanwhile (before: each listing held the
    event loop for the busy timeout, /health waited for all of them)."""
    con = sqlite3.connect(str(server.registry.root / "index.db"), isolation_level=None)
    con.execute("PRAGMA locking_mode = EXCLUSIVE")  # in WAL mode, this is what keeps readers out
    con.execute("BEGIN EXCLUSIVE")
    con.execute("INSERT INTO meta VALUES ('lock', 'held')")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    get = server.http.get
    try:
        with ThreadPoolExecutor(10) as pool:
            listings = [pool.submit(get, server.url + "/v1/models", headers=headers) for _ in range(10)]
            time.sleep(0.2)
            start = time.perf_counter()
            assert get(server.url + "/health").status_code == 200
            took = time.perf_counter() - start
            answers = [f.result() for f in listings]
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert took < 1.0, f"/health took {took:.2f} s during the listings"
    for r in answers:
        assert r.status_code == 503, r.text
        assert "locked" in r.json()["error"]["message"] and r.headers["retry-after"].isdigit()
    listed = get(server.url + "/v1/models", headers=headers)
    assert listed.status_code == 200 and "math@1" in listed.text


# --- loads -------------------------------------------------------------------------------------------------


def test_admin_load_of_another_file_under_a_resident_name_is_409(server, tmp_path):
    """Before: 200, and the old set kept answering under the name."""
    first = patch_file(tmp_path / "first.safetensors", "dup", fill=0.5)
    second = patch_file(tmp_path / "second.safetensors", "dup", fill=0.25)
    load = lambda path: post(server, "/admin/sets/load", {"name": str(path)}, key=ADMIN_KEY)  # noqa: E731
    assert load(first).status_code == 200
    digest = server.engine.digests["dup"]
    r = load(second)
    assert r.status_code == 409, r.text
    message = r.json()["error"]["message"]
    assert "'dup'" in message and digest in message and "unload" in message
    assert server.engine.digests["dup"] == digest
    assert load(first).status_code == 200  # the same file again: still fine
    unload = post(server, "/admin/sets/unload", {"name": "dup"}, key=ADMIN_KEY)
    assert unload.status_code == 200
    assert load(second).status_code == 200 and server.engine.digests["dup"] != digest
    post(server, "/admin/sets/unload", {"name": "dup"}, key=ADMIN_KEY)


class PooledEngine(FakeEngine):
    """The engine double placing sets in a real SlotPool (one set row), as the engine does."""

    def __init__(self):
        super().__init__()
        self.pool = SlotPool([0], 8, 4, 1)

    async def load(self, es, name=None, pin=False) -> str:
        name = name or es.manifest.task
        placement = self.pool.place(name, dict(es.manifest.experts), {}, pinned=pin)
        for gone in placement.evicted:
            del self.sets[gone], self.digests[gone]
        return await super().load(es, name, pin)

    def pin(self, name, pinned=True):
        super().pin(name, pinned)
        self.pool.pin(name, pinned)


def test_on_demand_load_while_every_set_is_pinned_is_503_with_retry_after(tmp_path):
    """A transient state (pins end, requests finish): 503 + Retry-After, not 409 (before)."""
    reg = Registry(tmp_path / "registry")
    reg.publish(patch_file(tmp_path / "a.safetensors", "a"))
    reg.publish(patch_file(tmp_path / "b.safetensors", "b", fill=1.0))
    settings = ServerSettings(
        base="tiny-base", registry=str(reg.root), max_model_len=CTX, admin_key=ADMIN_KEY
    )
    thread, url = start(settings, PooledEngine())
    try:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.post(url + "/admin/sets/load", json={"name": "a", "pin": True}, headers=admin, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(
            url + "/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit()
        assert "every resident set is pinned" in r.json()["error"]["message"]
        # an admin load meets the same pool: that stays a 409 naming what to unpin
        r = httpx.post(url + "/admin/sets/load", json={"name": "b"}, headers=admin, timeout=30)
        assert r.status_code == 409, r.text
        httpx.post(url + "/admin/sets/pin", json={"name": "a", "pinned": False}, headers=admin, timeout=30)
        r = httpx.post(
            url + "/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 200, r.text
    finally:
        thread.__exit__(None, None, None)
