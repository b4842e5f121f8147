"""`model="auto"`: the server picks the expert set whose routing profile matches the prompt's own
routing under the base (captured in the vLLM plugin during one base prefill).

On a tiny random base the sets' profiles are made unambiguous: each set's profile is the routing,
measured in transformers, of one prompt, so that prompt must choose that set, and a third prompt,
whose similarity to both stays below the threshold, the base.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from expertlib.esft.profiling import prompt_profile
from expertlib.profile import RoutingProfile, similarity

PROMPTS = {
    "alpha": "The cat sat on the mat and looked at the bird in the tree",
    "beta": "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
}
OTHER = "zzz qqq xxx"
THRESHOLD = 0.9


def test_profile_round_trips_compactly_and_refuses_damage():
    shares = {0: [0.5, 0.25, 0.25, 0.0], 3: [0.1, 0.2, 0.3, 0.4]}
    prof = RoutingProfile.from_shares(shares, tokens=12)
    back = RoutingProfile.model_validate_json(prof.model_dump_json()).arrays()
    assert sorted(back) == [0, 3]
    assert np.allclose(back[3], shares[3], atol=1e-3)
    assert len(prof.shares[0]) == 12  # 4 float16 = 8 bytes of base64
    assert similarity(back, back) == pytest.approx(1.0, abs=1e-2)  # the smoothing costs a little
    assert similarity({0: np.array([0, 0, 0, 1.0])}, back) < 0.01  # where the profile never routes
    assert similarity({9: np.ones(4)}, back) == 0.0  # no layer in common
    bad = prof.model_copy(update={"shares": {0: prof.shares[3][:8]}})
    with pytest.raises(ValueError, match="shares for 4 experts"):
        bad.arrays()


class _NoEngine:
    """An engine with no sets, whose prefill must never run."""

    def loaded_sets(self):
        return []

    def status(self):
        return {"sets": {}}

    async def routing_of(self, prompt_ids):
        raise AssertionError("no candidate: no prefill")


def test_auto_with_no_sets_serves_the_base_without_a_prefill():
    from expertlib.server.sets import SetCatalog

    catalog = SetCatalog(_NoEngine(), "tiny-moe")
    assert asyncio.run(catalog.resolve_auto([1, 2, 3], THRESHOLD)) == (None, {})


# --- base anchors, the similarity, compositions (no engine) ---------------------------------------

E = 8
#: one MoE layer; experts 0-3 carry a domain's shared tokens (digits), 4 the set's instruction word,
#: 5 the base task's: two tasks of one domain, as the demo's sum (a set) and add (the base's own)
SUM = {0: [0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0]}
ADD = {0: [0.2, 0.2, 0.2, 0.2, 0.0, 0.2, 0.0, 0.0]}
WORDS = {0: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]}


def _counts(shares, picks=40):
    return {layer: np.asarray(v) * picks for layer, v in shares.items()}


def test_similarity_is_the_likelihood_of_the_prompts_picks():
    same = similarity(_counts(SUM), RoutingProfile.from_shares(SUM, tokens=10).arrays())
    assert same == pytest.approx(1.0, abs=0.01)  # float16 storage and smoothing cost a little
    # an add prompt against sum's profile: a fifth of its picks land where sum never routes
    add_vs_sum = similarity(_counts(ADD), RoutingProfile.from_shares(SUM, tokens=10).arrays())
    assert 0.2 < add_vs_sum < 0.5
    assert similarity(_counts(WORDS), SUM) < 0.01  # disjoint experts
    assert similarity({0: np.zeros(E)}, SUM) == 0.0  # no picks
    assert similarity({1: np.ones(E)}, SUM) == 0.0  # no layer in common


class _Engine:
    """Sets resident from patch files; `routing_of` returns the counts the test sets."""

    def __init__(self, paths):
        from expertlib.patch import ExpertSet

        self.sets = {
            name: {"path": str(p), "content_digest": ExpertSet.open(p).manifest.content_digest}
            for name, p in paths.items()
        }
        self.counts = None
        self.prefills = 0

    def loaded_sets(self):
        return list(self.sets)

    def status(self):
        return {"sets": self.sets}

    def ref(self, name):
        from expertlib.slots import SetRef

        return SetRef(name, self.sets[name]["content_digest"], 1)

    async def routing_of(self, prompt_ids):
        self.prefills += 1
        return self.counts


@pytest.fixture(scope="module")
def profiled_sets(tmp_path_factory):
    """Two tiny sets: `sum` (profile SUM, carrying the base anchor `add`), `words` (profile WORDS)."""
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    root = tmp_path_factory.mktemp("anchors")
    make_vllm_tiny_base("qwen2_moe", root / "base")
    model = load_model(root / "base")
    out = {}
    for i, (name, experts, prof, anchors) in enumerate(
        [("sum", {0: [1]}, SUM, {"add": ADD}), ("words", {1: [2]}, WORDS, {})]
    ):
        es = random_expert_set(model, name, experts, seed=i + 1, scale=2.0)
        m = es.manifest
        prov = m.provenance.model_copy(
            update={
                "routing_profile": RoutingProfile.from_shares(prof, tokens=100 * (i + 1)),
                "base_anchors": {a: RoutingProfile.from_shares(v, tokens=50) for a, v in anchors.items()},
            }
        )
        es = ExpertSet(m.model_copy(update={"provenance": prov}), dict(es.tensors))
        out[name] = es.save(root / f"{name}.safetensors")
    return root, out


def test_a_base_anchor_keeps_its_prompts_on_the_base(profiled_sets):
    """The demo's add prompts went to sum's set (same domain, same experts) before base anchors."""
    from expertlib.server.sets import ANCHOR_PREFIX, SetCatalog

    _, paths = profiled_sets
    engine = _Engine(paths)
    catalog = SetCatalog(engine, "tiny-moe")
    engine.counts = _counts(ADD)
    ref, scores = asyncio.run(catalog.resolve_auto([1, 2], 0.1))
    assert ref is None  # the base: its own task's anchor is the nearest candidate
    assert scores[ANCHOR_PREFIX + "add"] > scores["sum"] > 0.1  # the set alone would have passed
    engine.counts = _counts(SUM)
    ref, scores = asyncio.run(catalog.resolve_auto([1, 2], 0.1))
    assert ref is not None and ref.name == "sum"
    engine.counts = _counts(WORDS)
    assert asyncio.run(catalog.resolve_auto([1, 2], 0.1))[0].name == "words"
    assert asyncio.run(catalog.resolve_auto([1, 2], 0.999))[0] is None  # below the threshold: base
    assert engine.prefills == 4


def test_a_composition_carries_its_parts_mixed_profile(profiled_sets):
    from expertlib.compose import compose_sets
    from expertlib.patch import ExpertSet

    _, paths = profiled_sets
    sets = [ExpertSet.open(paths["sum"]), ExpertSet.open(paths["words"])]
    prov = compose_sets(sets).manifest.provenance
    mixed = prov.routing_profile.arrays()[0]
    # token-weighted: sum measured 100 prompt tokens, words 200
    want = (np.asarray(SUM[0]) * 100 + np.asarray(WORDS[0]) * 200) / 300
    assert np.allclose(mixed, want, atol=1e-3)
    assert prov.routing_profile.tokens == 300
    assert set(prov.base_anchors) == {"add"}  # the parts' anchors travel with it
    bare = sets[1].manifest
    no_prof = ExpertSet(
        bare.model_copy(update={"provenance": bare.provenance.model_copy(update={"routing_profile": None})}),
        dict(sets[1].tensors),
    )
    assert compose_sets([sets[0], no_prof]).manifest.provenance.routing_profile is None


def test_an_unknown_name_inside_a_composition_is_a_404_naming_it(profiled_sets):
    from expertlib.errors import NotFoundError
    from expertlib.server.sets import SetCatalog

    _, paths = profiled_sets
    catalog = SetCatalog(_Engine(paths), "tiny-moe")
    with pytest.raises(NotFoundError, match="names 'nope'"):
        asyncio.run(catalog.resolve("sum+nope"))


def test_profile_cli_records_base_anchors(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from expertlib.cli.main import cli
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet
    from expertlib.vllm_plugin.testing import random_expert_set

    base = tiny_model_dir("qwen2_moe")
    model = load_model(base)
    path = random_expert_set(model, "t", {0: [1]}, seed=3).save(tmp_path / "t.safetensors")
    data, chat = tmp_path / "t.jsonl", tmp_path / "chat.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"add {i} and {i}", "completion": " x"}) + "\n" for i in range(4))
    )
    chat.write_text(
        "".join(json.dumps({"prompt": f"hello number {i}", "completion": " hi"}) + "\n" for i in range(4))
    )
    runner = CliRunner()
    r = runner.invoke(cli, ["profile", str(path), "--base", str(base), "--anchor", str(chat)])
    assert r.exit_code != 0 and "no routing profile yet" in r.output  # an anchor alone needs a profile
    r = runner.invoke(
        cli, ["profile", str(path), "--base", str(base), "--data", str(data), "--anchor", str(chat)]
    )
    assert r.exit_code == 0, r.output
    prov = ExpertSet.open(path).manifest.provenance
    assert prov.routing_profile is not None and set(prov.base_anchors) == {"chat"}
    assert prov.base_anchors["chat"].tokens > 0


def _profile_of(model, tok, text):
    from expertlib.esft.data import Sample

    ids = tuple(tok(text).input_ids)
    return prompt_profile(model, [Sample(ids, (-100,) * len(ids))], pad_id=tok.pad_token_id or 0)


def test_training_records_the_prompts_routing_profile(tiny_model_dir, tmp_path):
    """`expertlib train` writes the profile of the training prompts into the manifest."""
    import json

    from expertlib.esft.pipeline import RuntimeConfig, SelectionConfig, train_esft
    from expertlib.esft.training import TrainConfig

    data = tmp_path / "t.jsonl"
    lines = [json.dumps({"prompt": f"add {i} and {i + 1}", "completion": f" {2 * i + 1}"}) for i in range(8)]
    data.write_text("\n".join(lines) + "\n")
    es = train_esft(
        tiny_model_dir("qwen2_moe"),
        data,
        task="t",
        out=tmp_path / "t.safetensors",
        selection=SelectionConfig(top_p=0.3),
        config=TrainConfig(steps=1, batch_size=4),
        runtime=RuntimeConfig(device="cpu", progress=False),
    )
    prof = es.manifest.provenance.routing_profile
    assert prof is not None and prof.tokens > 0
    arrays = prof.arrays()
    assert all(abs(float(v.sum()) - 1) < 1e-2 for v in arrays.values())
    # and the base's own data (`--keep auto`: the base's own samples) as an anchor
    anchors = es.manifest.provenance.base_anchors
    assert set(anchors) == {"self"} and anchors["self"].tokens > 0


# --- served ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("vllm")
    from served_world import build, serve
    from transformers import AutoTokenizer

    from expertlib.patch import ExpertSet

    root = tmp_path_factory.mktemp("auto")
    profiles = {}

    def with_profile(name, es, model):  # each set carries the routing profile of its task's prompts
        tok = AutoTokenizer.from_pretrained(str(root / "base"))
        profiles[name] = _profile_of(model, tok, PROMPTS[name])
        if name == "alpha":  # the premise: OTHER matches neither set
            other = _profile_of(model, tok, OTHER).arrays()
            sims = [similarity(other, _profile_of(model, tok, t).arrays()) for t in PROMPTS.values()]
            assert max(sims) < THRESHOLD, sims
        m = es.manifest
        prov = m.provenance.model_copy(update={"routing_profile": profiles[name]})
        return ExpertSet(m.model_copy(update={"provenance": prov}), dict(es.tensors))

    base_dir, _ = build(root, edit=with_profile)
    assert similarity(profiles["alpha"].arrays(), profiles["beta"].arrays()) < THRESHOLD
    with serve(root, base_dir, "--auto-threshold", str(THRESHOLD)) as url:
        yield dict(url=url)


def _post(world, body, path="/v1/completions"):
    return httpx.post(world["url"] + path, json=body, timeout=120)


@pytest.mark.vllm
@pytest.mark.slow
def test_auto_picks_the_set_whose_profile_matches_the_prompt(world):
    for name, prompt in PROMPTS.items():
        body = dict(prompt=prompt, max_tokens=6, temperature=0)
        r = _post(world, {**body, "model": "auto"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"{name}@1"
        assert r.headers["x-expertlib-set"] == f"{name}@1"
        explicit = _post(world, {**body, "model": name}).json()
        assert r.json()["choices"][0]["text"] == explicit["choices"][0]["text"]
    r = _post(world, dict(model="auto", prompt=OTHER, max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-moe" and r.headers["x-expertlib-set"] == "base"
    # the capture rows are read and zeroed: the same prompt again decides the same
    again = _post(world, dict(model="auto", prompt=PROMPTS["beta"], max_tokens=2, temperature=0))
    assert again.json()["model"] == "beta@1"
    ids = [m["id"] for m in httpx.get(world["url"] + "/v1/models", timeout=30).json()["data"]]
    assert "auto" in ids
    metrics = httpx.get(world["url"] + "/metrics", timeout=30).text
    assert 'expertlib_auto_decisions_total{model="beta@1"} 2.0' in metrics
    assert 'expertlib_auto_decisions_total{model="base"} 1.0' in metrics


@pytest.mark.vllm
@pytest.mark.slow
def test_auto_on_chat_and_concurrently(world):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [
        dict(model="auto", prompt=PROMPTS[n], max_tokens=3, temperature=0) for n in ["alpha", "beta"] * 6
    ]
    with ThreadPoolExecutor(12) as pool:
        got = [r.json()["model"] for r in pool.map(lambda b: _post(world, b), bodies)]
    assert got == ["alpha@1", "beta@1"] * 6  # more requests than capture rows, none mixed up
    chat = dict(model="auto", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    r = _post(world, chat, "/v1/chat/completions")
    assert r.status_code == 200 and r.headers["x-expertlib-set"] in ("alpha@1", "beta@1", "base")
