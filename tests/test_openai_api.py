"""The OpenAI API to the depth of vLLM's server (logprobs, echo, structured outputs, tokenizer
routes), driven by the official `openai` client against a real `expertlib serve` on a tiny base
with two expert sets. Every log-probability is checked against transformers with the set applied.

One server, shared with other modules that only ask it (conftest's `shared_server`).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from served_world import BASE_NAME  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ATOL = 1e-4  # float32 in both engines; measured differences are ~5e-7
MODELS = [(BASE_NAME, None), ("alpha", "alpha"), ("beta@1", "beta")]
NAMES = [*MODELS, (f"{BASE_NAME}:beta", "beta")]  # every form of `model`, incl. SGLang's BASE:task
PROMPT = "The cat sat on the mat"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "member": {"type": "boolean"}},
    "required": ["name", "member"],
    "additionalProperties": False,
}


LOOKBEHIND = {
    "type": "json_schema",
    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}},
}
DANGLING_REF = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/missing"}}}


@pytest.fixture(scope="module")
def world(shared_server):
    return shared_server


def client(world) -> openai.OpenAI:
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_echo_scores_the_prompt_with_each_sets_experts_concurrently(world):
    """max_tokens=0 + echo + logprobs (what lm-eval's loglikelihood sends): the prompt's token
    logprobs are each set's own, also when the three requests share the engine's batches."""
    ref = world["ref"]
    ids = ref.tok.encode(PROMPT)

    def score(model):
        return client(world).completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=3)

    with ThreadPoolExecutor(len(NAMES) * 2) as pool:
        results = list(pool.map(score, [m for m, _ in NAMES] * 2))
    got = {}
    for (model, es), r in zip(NAMES * 2, results, strict=True):
        choice = r.choices[0]
        want, rows = ref.token_logprobs(ids, es)
        lp = choice.logprobs
        assert choice.text == PROMPT and r.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
        assert lp.tokens == [ref.tok.decode([t]) for t in ids]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(ids))]
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want.tolist(), strict=True)) < ATOL, (
            model
        )
        best = rows.max(dim=-1).values.tolist()  # the top alternative of each position is listed
        assert all(
            abs(max(top.values()) - b) < ATOL for top, b in zip(lp.top_logprobs[1:], best, strict=True)
        )
        got.setdefault(model, lp.token_logprobs[1:])
    assert got[BASE_NAME] != got["alpha"] and got["alpha"] != got["beta@1"]  # the sets matter


def test_generated_logprobs_echo_and_streaming(world):
    ref = world["ref"]
    ids = ref.tok.encode(PROMPT)
    c = client(world)
    r = c.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    gen = ref.greedy(ids, "alpha", 6)
    want, _ = ref.token_logprobs(ids + gen, "alpha")
    assert len(lp.tokens) == 6 and lp.tokens == [ref.tok.decode([t]) for t in gen]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want[-6:].tolist(), strict=True)) < ATOL
    assert all(
        len(top) <= 3 and max(top.values()) == v
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    echoed = c.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    e = echoed.choices[0]
    assert e.text == PROMPT + r.choices[0].text and e.logprobs.tokens == [
        *e.logprobs.tokens[: len(ids)],
        *lp.tokens,
    ]
    assert e.logprobs.token_logprobs[len(ids) :] == lp.token_logprobs
    chunks = list(
        c.completions.create(
            model="alpha",
            prompt=PROMPT,
            max_tokens=6,
            temperature=0,
            logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [
        x
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for x in ch.choices[0].logprobs.token_logprobs
    ]
    assert streamed == lp.token_logprobs and chunks[-1].usage.completion_tokens == 6
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    chunks = list(  # echo while streaming: the prompt and its logprobs come first
        c.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == e.text
    assert [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs] == (
        e.logprobs.token_logprobs
    )


def test_chat_logprobs_and_sampling_parameters(world):
    ref = world["ref"]
    c = client(world)
    msgs = [{"role": "user", "content": "hello"}]
    ids = ref.tok.encode(
        ref.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    r = c.chat.completions.create(
        model="beta", messages=msgs, max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    gen = ref.greedy(ids, "beta", 5)
    want, _ = ref.token_logprobs(ids + gen, "beta")
    assert len(content) == 5 and all(len(x.top_logprobs) == 3 for x in content)
    assert max(abs(x.logprob - w) for x, w in zip(content, want[-5:].tolist(), strict=True)) < ATOL
    assert all(abs(x.top_logprobs[0].logprob - x.logprob) < ATOL for x in content)  # greedy: chosen is best
    assert r.usage.completion_tokens == 5
    streamed = [
        x.logprob
        for ch in c.chat.completions.create(
            model="beta",
            messages=msgs,
            max_tokens=5,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            stream=True,
        )
        if ch.choices and ch.choices[0].logprobs
        for x in ch.choices[0].logprobs.content
    ]
    assert streamed == [x.logprob for x in content]
    # seed: the same seed gives the same sample; n choices; include_usage on a chat stream
    kw = dict(model="alpha", messages=msgs, max_tokens=8, temperature=1.0, seed=7)
    a, b = (c.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b
    assert len(c.chat.completions.create(**kw, n=3).choices) == 3
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert (
        chunks[-1].usage.completion_tokens >= 1
        and "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == a
    )
    assert len(a) >= 2, a
    stop = a[len(a) // 2]
    stopped = c.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert stopped.message.content == a[: a.index(stop)] and stopped.finish_reason == "stop"


def test_json_schema_output_parses_and_validates(world):
    """vLLM's structured outputs (xgrammar on CPU) hold even a random tiny model to the schema."""
    c = client(world)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for model, _ in MODELS:
        r = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "a person"}],
            max_tokens=80,
            seed=0,
            response_format=fmt,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = c.completions.create(
        model="beta", prompt="JSON: ", max_tokens=80, seed=0, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    r = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "{}"}],
        max_tokens=80,
        seed=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        (
            "chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
        ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        # valid JSON schemas vLLM's structured-output backend cannot compile: refused before streaming
        ("chat/completions", {"response_format": LOOKBEHIND, "stream": True}, "response_format"),
        ("completions", {"prompt": "x", "response_format": DANGLING_REF}, "response_format"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(world, path, body, param):
    if path.startswith("chat"):
        body = {"messages": [{"role": "user", "content": "x"}], **body}
    r = httpx.post(f"{world['url']}/v1/{path}", json={"model": "alpha", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(world["url"] + "/health").status_code == 200


def test_tokenize_detokenize_and_model_parents(world):
    tok = world["ref"].tok
    r = httpx.post(world["url"] + "/tokenize", json={"model": "alpha", "prompt": PROMPT}).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    back = httpx.post(world["url"] + "/detokenize", json={"model": "beta", "tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"])}
    cards = {m.id: m for m in client(world).models.list().data}
    assert cards["alpha@1"].parent == BASE_NAME and cards["beta@1"].parent == BASE_NAME
    assert cards[BASE_NAME].parent is None


def test_eval_on_user_data_through_the_server_equals_in_process(world, tmp_path):
    """`expertlib eval --data --url`: the served numbers are the in-process ones, set by set."""
    from expertlib.evaluation import evaluate_data

    data = tmp_path / "qa.jsonl"
    rows = [{"prompt": p, "completion": a} for p, a in [("2+2=", "4"), ("abc", "def"), ("hi", "hello there")]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(max_new_tokens=6, keep_predictions=True)
    served = evaluate_data(world["base_dir"], data, ["alpha", "beta@1"], url=world["url"], **kw)
    local = evaluate_data(
        world["base_dir"],
        data,
        [world["root"] / "alpha.safetensors", world["root"] / "beta.safetensors"],
        **kw,
    )
    for s, loc in zip(served.columns, local.columns, strict=True):
        assert served.predictions[s] == local.predictions[loc], s
        assert served.metrics[s]["loss"] == pytest.approx(local.metrics[loc]["loss"], abs=1e-4), s
        assert served.metrics[s]["exact_match"] == local.metrics[loc]["exact_match"]
    assert len({m["loss"] for m in served.metrics.values()}) == 3  # each set scored with its own experts
