"""HTTP-layer unit tests: the real app on a real port, driven by the official `openai` client, over
a deterministic in-process test double of the engine protocol (no vLLM engine is started here;
tests/test_server_e2e.py runs the same API over the real engine).

The double answers each prompt with characters derived from (expert set, prompt tokens, step), so
every expert set gives a different, reproducible answer, and records aborts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from server_process import ServerThread, free_port  # noqa: F401 (test modules import both from here)

from expertlib.errors import EngineError, NotLoadedError
from expertlib.registry import Registry
from expertlib.server import ServerSettings, create_app
from expertlib.server.backend import ServingEngine
from expertlib.slots import SetRef
from expertlib.testing import make_tokenizer

API_KEY = "sk-test"
ADMIN_KEY = "sk-admin"
CTX = 64


class FakeEngine:
    """Deterministic stand-in for AsyncExpertEngine (HTTP-layer tests only)."""

    def __init__(self, delay: float = 0.0):
        self.tokenizer = make_tokenizer()
        self.sets: dict[str, bool] = {}  # name -> pinned
        self.digests: dict[str, str] = {}  # name -> content digest of the set loaded under it
        self.aborted: list[str] = []
        self.salts: list[str | None] = []
        self.active: set[str] = set()
        self.delay = delay
        self.max_model_len = CTX

    async def load(self, es, name=None, pin=False) -> str:
        name = name or es.manifest.task
        self.sets[name] = pin
        self.digests[name] = es.manifest.content_digest
        return name

    async def unload(self, name):
        if name not in self.sets:
            raise NotLoadedError(f"{name} is not loaded")
        del self.sets[name]

    def pin(self, name, pinned=True):  # sync, like AsyncExpertEngine.pin
        if name not in self.sets:
            raise NotLoadedError(f"{name} is not loaded")
        self.sets[name] = pinned

    def status(self):  # the shape of AsyncExpertEngine.status()
        return {
            "slots_per_layer": 8,
            "slots_used": {0: len(self.sets), 1: 0},
            "sets": {n: {"pinned": p} for n, p in self.sets.items()},
        }

    def loaded_sets(self):
        return list(self.sets)

    def ref(self, name):
        if name not in self.sets:
            raise NotLoadedError(f"{name} is not loaded")
        return SetRef(name, self.digests[name], list(self.sets).index(name) + 1)

    @staticmethod
    def answer(prompt: list[int], expert_set: str | None, k: int, choice: int = 0) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        salt = sum(map(ord, expert_set or "base"))
        return alphabet[(sum(prompt) + salt + 7 * k + 3 * choice) % 26]

    async def generate(self, prompt, sampling_params, request_id, expert_set: SetRef | None):
        if expert_set is not None and self.digests.get(expert_set.name) != expert_set.digest:
            raise NotLoadedError(f"{expert_set.name} is not loaded")
        self.salts.append(expert_set.cache_salt if expert_set else None)  # the real engine salts with it
        expert_set = expert_set.name if expert_set else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sp = self.last_params = sampling_params
        texts = [""] * sp.n
        done = [None] * sp.n
        self.active.add(request_id)
        try:
            for k in range(sp.max_tokens):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if k == 2 and ids == self.tokenizer.encode("boom"):
                    raise EngineError("the engine died")
                for c in range(sp.n):
                    if done[c] is None:
                        texts[c] += self.answer(ids, expert_set, k, c)
                        if any(s in texts[c] for s in sp.stop or []):
                            texts[c] = texts[c][: min(texts[c].index(s) for s in sp.stop if s in texts[c])]
                            done[c] = "stop"
                        elif k == sp.max_tokens - 1:
                            done[c] = "length"
                finished = all(d is not None for d in done)
                if finished or str(sp.output_kind).endswith("CUMULATIVE"):
                    outs = [
                        SimpleNamespace(
                            index=c, text=texts[c], token_ids=[0] * len(texts[c]), finish_reason=done[c]
                        )
                        for c in range(sp.n)
                    ]
                    yield SimpleNamespace(request_id=request_id, outputs=outs, finished=finished)
                if finished:
                    return
        finally:
            self.active.discard(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def get_tokenizer(self):  # sync, like AsyncExpertEngine.get_tokenizer
        return self.tokenizer

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    engine = FakeEngine(delay=0.002)
    go = threading.Event()

    async def factory(_settings):
        await asyncio.to_thread(go.wait, 60)  # stays "starting" until a test releases it
        return engine

    root = tmp_path_factory.mktemp("fake-server")
    reg = Registry(root / "registry")
    reg.publish(_patch_file(root / "math.safetensors", "math"))
    other = Registry(root / "other")  # pushes `code` into the server's registry over HTTP
    other.publish(_patch_file(root / "code.safetensors", "code"))
    settings = ServerSettings(
        base="tiny-base",
        registry=str(root / "registry"),
        expert_sets=["math"],
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        max_queue=4,
        max_model_len=CTX,
        load_on_demand=False,  # the not-loaded answers are tested here; on demand in test_serve_on_demand
    )
    app = create_app(settings, engine_factory=factory)
    port = free_port()
    with ServerThread(app, port):
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            engine=engine,
            app=app,
            go=go,
            patch=root / "math.safetensors",
            other=other,
        )


def _patch_file(path, task):
    """A real (tiny) expert-set patch file: loading goes through ExpertSet.open / the registry."""
    import torch

    from expertlib.identity import BaseIdentity
    from expertlib.moe import ExpertWeights
    from expertlib.patch import ExpertSet

    w = ExpertWeights(gate=torch.zeros(2, 4), up=torch.zeros(2, 4), down=torch.zeros(4, 2))
    base = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny-base")
    es = ExpertSet.build(
        task=task, base=base, experts={(0, 1): w}, base_digests={(0, 1): "sha256:" + "1" * 64}
    )
    return es.save(path)


def _ready(fake):
    fake.go.set()
    state = fake.app.state.server
    deadline = time.time() + 10
    while not state.ready:
        assert state.startup_error is None, state.startup_error
        assert time.time() < deadline, "not ready"
        time.sleep(0.01)


def client(fake, key=API_KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=key, max_retries=0, **kw)


def expected(fake, prompt_ids, expert_set, n_tokens, choice=0) -> str:
    return "".join(FakeEngine.answer(prompt_ids, expert_set, k, choice) for k in range(n_tokens))


# --- readiness ------------------------------------------------------------------------------------


def test_health_is_503_until_ready_then_200(fake_server):
    r = httpx.get(fake_server.url + "/health")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_ready"
    with pytest.raises(openai.InternalServerError) as e:
        client(fake_server).completions.create(model="tiny-base", prompt="hi", max_tokens=2)
    assert e.value.status_code == 503
    _ready(fake_server)
    assert httpx.get(fake_server.url + "/health").status_code == 200
    assert fake_server.engine.loaded_sets() == ["math@1"]


# --- inference ------------------------------------------------------------------------------------


def test_models_lists_base_and_loaded_sets(fake_server):
    _ready(fake_server)
    models = client(fake_server).models.list()
    ids = {m.id: m for m in models.data}
    assert set(ids) == {"tiny-base", "math@1", "auto"}  # auto: the set chosen from the prompt's routing
    assert ids["math@1"].aliases == ["math"]
    assert [x["id"] for x in models.model_extra["loadable"]] == []
    assert client(fake_server).models.retrieve("math").id == "math@1"
    with pytest.raises(openai.NotFoundError):
        client(fake_server).models.retrieve("poetry")
    assert (
        ids["math@1"].parent == "tiny-base"
        and ids["math@1"].owned_by == "expertlib"
        and ids["math@1"].created > 0
    )


def test_completion_per_set_and_usage(fake_server):
    _ready(fake_server)
    c = client(fake_server)
    tok = fake_server.engine.tokenizer
    ids = tok.encode("2+2=")
    for model, es in [
        ("tiny-base", None),
        ("math", "math@1"),
        ("math@1", "math@1"),
        ("math@latest", "math@1"),
    ]:
        r = c.completions.create(model=model, prompt="2+2=", max_tokens=5, temperature=0)
        assert r.choices[0].text == expected(fake_server, ids, es, 5)
        assert r.choices[0].finish_reason == "length"
        assert (
            r.usage.prompt_tokens == len(ids)
            and r.usage.completion_tokens == 5
            and r.usage.total_tokens == len(ids) + 5
        )
        assert r.model == model
    c.completions.create(
        model="math", prompt="2+2=", max_tokens=3, seed=5, top_p=0.5, extra_body={"ignore_eos": True}
    )
    sp = fake_server.engine.last_params
    assert (sp.seed, sp.top_p, sp.ignore_eos, sp.max_tokens, sp.temperature) == (5, 0.5, True, 3, 1.0)
    c.completions.create(
        model="math",
        prompt="2+2=",
        max_tokens=2,
        logit_bias={"5": -100},
        extra_body={"top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2},
    )
    sp = fake_server.engine.last_params  # converted by vLLM's request model
    assert (sp.logit_bias, sp.top_k, sp.min_p, sp.repetition_penalty) == ({5: -100}, 4, 0.1, 1.2)
    assert fake_server.engine.salts[-1].startswith("expertlib:blake3:")  # sets are salted, the base is not
    c.completions.create(model="tiny-base", prompt="2+2=", max_tokens=1)
    assert fake_server.engine.salts[-1] is None
    base = c.completions.create(model="tiny-base", prompt="2+2=", max_tokens=5).choices[0].text
    math = c.completions.create(model="math", prompt="2+2=", max_tokens=5).choices[0].text
    assert base != math


def test_completion_batch_n_and_stop(fake_server):
    _ready(fake_server)
    c = client(fake_server)
    tok = fake_server.engine.tokenizer
    r = c.completions.create(model="math", prompt=["ab", "cd"], max_tokens=4, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[3].text == expected(fake_server, tok.encode("cd"), "math@1", 4, choice=1)
    full = expected(fake_server, tok.encode("xy"), "math@1", 8)
    stop = full[3]
    r = c.completions.create(model="math", prompt="xy", max_tokens=8, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_uses_the_chat_template(fake_server):
    _ready(fake_server)
    tok = fake_server.engine.tokenizer
    msgs = [{"role": "user", "content": "hello"}]
    r = client(fake_server).chat.completions.create(model="math", messages=msgs, max_tokens=6)
    ids = tok.encode(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert r.choices[0].message.content == expected(fake_server, ids, "math@1", 6)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_completion_and_chat(fake_server):
    _ready(fake_server)
    c = client(fake_server)
    tok = fake_server.engine.tokenizer
    chunks = list(
        c.completions.create(
            model="math", prompt="abc", max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == expected(fake_server, tok.encode("abc"), "math@1", 5)
    assert chunks[-1].usage.completion_tokens == 5
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    msgs = [{"role": "user", "content": "hi"}]
    chunks = list(c.chat.completions.create(model="tiny-base", messages=msgs, max_tokens=4, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = tok.encode(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected(fake_server, ids, None, 4)
    raw = httpx.post(
        fake_server.url + "/v1/completions",
        json={"model": "math", "prompt": "abc", "max_tokens": 2, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-request-id"].startswith("cmpl-") and raw.headers["x-request-id"] in raw.text
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_engine_failure_mid_request(fake_server):
    """Before the first byte: a JSON error with the error's status; mid-stream: an error event, then [DONE]."""
    _ready(fake_server)
    body = {"model": "math", "prompt": "boom", "max_tokens": 5}
    err = _assert_openai_error(_post(fake_server, "/v1/completions", body), 503)
    assert "the engine died" in err["message"]
    raw = _post(fake_server, "/v1/completions", {**body, "stream": True})
    events = [ln.removeprefix("data: ") for ln in raw.text.splitlines() if ln.startswith("data: ")]
    assert json.loads(events[-2])["error"]["message"].startswith("the engine died") and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"]  # tokens before the failure were sent
    assert fake_server.app.state.server.admission.depth == 0


# --- errors ---------------------------------------------------------------------------------------


def _post(fake, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(fake.url + path, json=body, headers=headers)


def _assert_openai_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "math", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "math", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "math", "prompt": "x", "n": 0}, "n"),
        ({"model": "math", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "math", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "math", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "math", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "math", "prompt": "x", "n": 2, "best_of": 3}, "best_of"),
        ({"model": "math", "prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
        ({"model": "math", "prompt": []}, "prompt"),
        ({"model": "math", "prompt": ""}, "prompt"),
        ({"model": "math", "prompt": [1, 100000]}, "prompt"),
        ({"model": "math"}, "prompt"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_parameters_are_400(fake_server, body, param):
    _ready(fake_server)
    err = _assert_openai_error(_post(fake_server, "/v1/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error"


CHAT = {"model": "math", "messages": [{"role": "user", "content": "x"}]}
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": BAD_SCHEMA}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ],
)
def test_bad_chat_parameters_are_400(fake_server, extra, param):
    _ready(fake_server)
    err = _assert_openai_error(
        _post(fake_server, "/v1/chat/completions", {**CHAT, **extra}), 400, param=param
    )
    assert param.split(".")[0] in err["message"]


def test_bad_json_and_bad_chat_are_400(fake_server):
    _ready(fake_server)
    r = httpx.post(
        fake_server.url + "/v1/completions", content=b"{nope", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    _assert_openai_error(r, 400)
    _assert_openai_error(
        _post(fake_server, "/v1/chat/completions", {"model": "math", "messages": []}), 400, "messages"
    )
    with pytest.raises(openai.BadRequestError):
        client(fake_server).chat.completions.create(
            model="math", messages=[{"role": "wizard", "content": "x"}]
        )


def test_unknown_model_is_404(fake_server):
    _ready(fake_server)
    with pytest.raises(openai.NotFoundError) as e:
        client(fake_server).completions.create(model="poetry", prompt="x", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


def test_prompt_too_long_is_400(fake_server):
    _ready(fake_server)
    with pytest.raises(openai.BadRequestError) as e:
        client(fake_server).completions.create(model="math", prompt="x" * (CTX + 5), max_tokens=2)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client(fake_server).completions.create(model="math", prompt="xy", max_tokens=CTX)
    assert e.value.param == "max_tokens"


def test_auth_401_and_403(fake_server):
    _ready(fake_server)
    with pytest.raises(openai.AuthenticationError):
        client(fake_server, key="wrong").models.list()
    _assert_openai_error(httpx.get(fake_server.url + "/v1/models"), 401)
    assert client(fake_server, key=ADMIN_KEY).models.list().data  # the admin key works everywhere
    _assert_openai_error(_post(fake_server, "/admin/sets/pin", {"name": "math"}, key=API_KEY), 403)
    _assert_openai_error(_post(fake_server, "/admin/sets/pin", {"name": "math"}, key="wrong"), 401)
    _assert_openai_error(_post(fake_server, "/admin/sets/pin", {"name": "math"}, key=None), 401)
    assert httpx.get(fake_server.url + "/health").status_code == 200  # health is open
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}  # metrics name the loaded sets: admin or metrics key
    assert httpx.get(fake_server.url + "/metrics", headers=admin).status_code == 200


def test_queue_full_is_429_and_disconnect_aborts(fake_server):
    _ready(fake_server)
    engine = fake_server.engine
    engine.delay = 0.2
    try:
        body = {"model": "math", "prompt": "slow", "max_tokens": 50, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(timeout=30) as h:
            streams = [
                h.stream("POST", fake_server.url + "/v1/completions", json=body, headers=headers)
                for _ in range(4)
            ]
            responses = [s.__enter__() for s in streams]
            lines = [resp.iter_lines() for resp in responses]  # keep them: a dropped iterator closes
            for resp, it in zip(responses, lines, strict=True):
                assert resp.status_code == 200
                assert next(it).startswith("data: ")  # generation has started
            assert fake_server.app.state.server.admission.depth == 4
            err = _assert_openai_error(_post(fake_server, "/v1/completions", {**body, "stream": False}), 429)
            assert err["type"] == "rate_limit_error"
            n_aborted = len(engine.aborted)
            for s in streams:
                s.__exit__(None, None, None)  # client disconnects mid-stream
        deadline = time.time() + 10
        while len(engine.aborted) < n_aborted + 4 or engine.active:
            assert time.time() < deadline, (engine.aborted, engine.active)
            time.sleep(0.02)
        assert fake_server.app.state.server.admission.depth == 0
        # a non-streaming request whose client goes away is aborted as well
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                fake_server.url + "/v1/completions",
                json={**body, "stream": False},
                headers=headers,
                timeout=0.5,
            )
        deadline = time.time() + 10
        while len(engine.aborted) < n_aborted + 5 or engine.active:
            assert time.time() < deadline, (engine.aborted, engine.active)
            time.sleep(0.02)
    finally:
        engine.delay = 0.002


def test_metrics_count_requests_tokens_and_latency_per_set(fake_server):
    _ready(fake_server)
    client(fake_server).completions.create(model="math", prompt="x", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client(fake_server).completions.create(model="nope", prompt="x", max_tokens=3)
    text = httpx.get(fake_server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'expertlib_requests_total{endpoint="completions",model="math@1",status="200"}' in text
    assert 'expertlib_completion_tokens_total{model="math@1"}' in text
    assert 'expertlib_request_latency_seconds_count{model="math@1"}' in text
    assert 'model="unknown",status="404"' in text
    assert "expertlib_slots_used 1.0" in text and "expertlib_slots_total 8.0" in text
    assert "expertlib_sets_loaded 1.0" in text and "expertlib_queue_depth 0.0" in text
    assert json.loads(httpx.get(fake_server.url + "/health").text)["status"] == "ok"


# --- admin ----------------------------------------------------------------------------------------


def test_admin_load_pin_unload_status(fake_server):
    _ready(fake_server)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(fake_server.url + "/admin/sets/pin", json={"name": "math"}, headers=admin)
    assert r.status_code == 200 and r.json()["pinned"] is True
    st = httpx.get(fake_server.url + "/admin/status", headers=admin).json()
    assert (
        st["loaded"] == ["math@1"]
        and st["ready"]
        and st["engine"]["sets"]["math@1"]["pinned"]
        and st["max_queue"] == 4
    )
    r = httpx.post(fake_server.url + "/admin/sets/unload", json={"name": "math"}, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "math@1"
    with pytest.raises(openai.NotFoundError) as e:  # registered, not loaded, no --load-on-demand
        client(fake_server).completions.create(model="math", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_loaded"
    assert [x["id"] for x in client(fake_server).models.list().model_extra["loadable"]] == ["math@1"]
    _assert_openai_error(
        httpx.post(fake_server.url + "/admin/sets/unload", json={"name": "math"}, headers=admin), 404
    )
    r = httpx.post(fake_server.url + "/admin/sets/load", json={"name": str(fake_server.patch)}, headers=admin)
    assert r.status_code == 200 and r.json()["name"] == "math"
    assert client(fake_server).completions.create(model="math", prompt="x", max_tokens=2).choices[0].text
    _assert_openai_error(
        httpx.post(fake_server.url + "/admin/sets/load", json={"name": "nothing-here"}, headers=admin), 404
    )


def test_fake_engine_satisfies_the_protocol():
    assert isinstance(FakeEngine(), ServingEngine)


def test_registry_routes_under_admin_key_push_then_load(fake_server):
    _ready(fake_server)
    url = fake_server.url + "/admin/registry"
    _assert_openai_error(httpx.get(url + "/entries", headers={"Authorization": f"Bearer {API_KEY}"}), 403)
    _assert_openai_error(httpx.get(url + "/entries"), 401)
    fake_server.other.push("code", url, token=ADMIN_KEY)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    names = {e["name"] for e in httpx.get(url + "/entries", headers=admin).json()["entries"]}
    assert names == {"math", "code"}
    with pytest.raises(openai.NotFoundError):
        client(fake_server).completions.create(model="code", prompt="x", max_tokens=2)
    r = httpx.post(
        fake_server.url + "/admin/sets/load", json={"name": "code@latest", "pin": True}, headers=admin
    )
    assert r.status_code == 200 and r.json() == {"name": "code@1", "loaded": True, "pinned": True}
    tok = fake_server.engine.tokenizer
    text = client(fake_server).completions.create(model="code", prompt="ab", max_tokens=3).choices[0].text
    assert text == expected(fake_server, tok.encode("ab"), "code@1", 3)


def test_startup_loads_all_registered_sets_and_reports_failures(tmp_path):
    from expertlib.server import ServerState

    reg = Registry(tmp_path / "reg")
    for task in ("math", "code"):
        reg.publish(_patch_file(tmp_path / f"{task}.safetensors", task))
    reg.publish(_patch_file(tmp_path / "math2.safetensors", "math"))  # math@2 (a newer manifest time)

    async def start(settings):
        state = ServerState(settings, engine_factory=lambda _s: FakeEngine())
        await state.start()
        return state

    state = asyncio.run(start(ServerSettings(base="b", registry=str(tmp_path / "reg"), all_sets=True)))
    assert state.ready and sorted(state.engine.loaded_sets()) == ["code@1", "math@1", "math@2"]
    assert (
        asyncio.run(state.catalog.resolve("math")).name == "math@2"
    )  # a bare task: its latest loaded version

    state = asyncio.run(
        start(ServerSettings(base="b", registry=str(tmp_path / "reg"), expert_sets=["poetry"]))
    )
    assert not state.ready and "poetry" in str(state.startup_error)
    with pytest.raises(Exception, match="failed to start"):
        state.require_ready()


def test_load_on_demand_loads_a_registered_set_on_first_use(tmp_path):
    from expertlib.errors import NotFoundError
    from expertlib.server.sets import SetCatalog

    reg = Registry(tmp_path / "reg")
    reg.publish(_patch_file(tmp_path / "math.safetensors", "math"), tags=["stable"])
    engine = FakeEngine()
    catalog = SetCatalog(engine, "base", reg, load_on_demand=True)
    assert asyncio.run(catalog.resolve("math@stable")).name == "math@1"
    assert engine.loaded_sets() == ["math@1"]
    assert asyncio.run(catalog.resolve("base")) is None
    with pytest.raises(NotFoundError):
        asyncio.run(catalog.resolve("math@7"))


def test_tokenize_and_detokenize(fake_server):
    _ready(fake_server)
    tok = fake_server.engine.tokenizer
    r = _post(fake_server, "/tokenize", {"model": "math", "prompt": "2+2=", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode("2+2=") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == CTX and body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"])
    msgs = [{"role": "user", "content": "hi"}]
    chat = _post(fake_server, "/tokenize", {"model": "tiny-base", "messages": msgs}).json()
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    r = _post(fake_server, "/detokenize", {"model": "math", "tokens": body["tokens"]})
    assert r.json() == {"prompt": tok.decode(body["tokens"])}
    _assert_openai_error(_post(fake_server, "/detokenize", {"tokens": [10**6]}), 400, param="tokens")
    _assert_openai_error(_post(fake_server, "/tokenize", {"model": "poetry", "prompt": "x"}), 404)
    _assert_openai_error(_post(fake_server, "/tokenize", {"prompt": "x"}, key=None), 401)


def test_tool_calls_parsed_by_vllms_parser_for_the_template():
    """A template that renders tools in the hermes format (`<tool_call>`) gets vLLM's hermes parser;
    streaming and forced tool choices are refused by name, and so is a template without tools."""
    from expertlib.errors import InvalidRequestError
    from expertlib.server import protocol as p
    from expertlib.server import tools

    tok = make_tokenizer()
    fn = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    msgs = [{"role": "user", "content": "x"}]
    req = p.ChatCompletionRequest(model="m", messages=msgs, tools=[fn])
    with pytest.raises(InvalidRequestError) as e:  # the test tokenizer's template knows no tools
        tools.check(tok, req)
    assert e.value.param == "tools"
    assert (
        tools.check(tok, p.ChatCompletionRequest(model="m", messages=msgs, tools=[fn], tool_choice="none"))
        is None
    )
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    tok.chat_template = (
        "{% for t in tools %}{{ t | tojson }}{% endfor %}Call tools as <tool_call>{json}</tool_call>\n"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert tools.check(tok, req) == "hermes"
    text = 'Sure. <tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = tools.extract("hermes", tok, req, text)
    assert content.strip() == "Sure." and [c.function.name for c in calls] == ["weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert tools.extract("hermes", tok, req, "no call") == ("no call", [])
    for extra, param in [({"stream": True}, "stream"), ({"tool_choice": "required"}, "tool_choice")]:
        with pytest.raises(InvalidRequestError) as e:
            tools.check(tok, p.ChatCompletionRequest(model="m", messages=msgs, tools=[fn], **extra))
        assert e.value.param == param
