"""`model="a+b"`: several expert sets served as one remap row, and `expertlib compose` on disk.

The library part (`compose_sets`) runs on a tiny transformers model; the served part starts one
`expertlib serve` (tests/served_world.py: sets alpha and beta, plus gamma, which replaces one of
alpha's experts) and checks a composed request's greedy answer against transformers with the
composed patch merged into the base.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from click.testing import CliRunner

from expertlib.compose import compose_sets
from expertlib.errors import CompositionError
from expertlib.patch import ExpertSet, pair_key

ALPHA = {0: [1, 3], 1: [0, 5]}
BETA = {0: [2], 1: [1, 6, 7]}
GAMMA = {0: [3, 4]}  # layer 0 expert 3 is alpha's too


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from expertlib.moe import load_model
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    root = tmp_path_factory.mktemp("compose")
    make_vllm_tiny_base("qwen2_moe", root / "base")
    model = load_model(root / "base")
    sets = {
        name: random_expert_set(model, name, m, seed=i + 1, scale=2.0)
        for i, (name, m) in enumerate({"alpha": ALPHA, "beta": BETA, "gamma": GAMMA}.items())
    }
    return root, model, sets


def test_composition_holds_both_sets_experts_with_their_digests(tiny):
    _, _, sets = tiny
    ab = compose_sets([sets["alpha"], sets["beta"]])
    m = ab.manifest
    assert m.task == "alpha+beta"
    assert m.experts == {0: [1, 2, 3], 1: [0, 1, 5, 6, 7]}
    for name in ("alpha", "beta"):
        part = sets[name].manifest
        for pair in part.pairs():
            # the same tensors, so a server holding the parts shares their slots (same digests)
            assert m.expert_digests[pair_key(*pair)] == part.expert_digests[pair_key(*pair)]
            assert m.base_expert_digests[pair_key(*pair)] == part.base_expert_digests[pair_key(*pair)]
    assert [p["task"] for p in m.provenance.extra["parts"]] == ["alpha", "beta"]
    assert ab.verify()  # content digest of the composed tensors is consistent


def test_conflicting_experts_are_refused_naming_them(tiny):
    _, _, sets = tiny
    with pytest.raises(CompositionError, match=r"layer 0 expert 3 \(alpha and gamma\)") as info:
        compose_sets([sets["alpha"], sets["gamma"]])
    assert info.value.conflicts == [(0, 3, ["alpha", "gamma"])]
    assert "'>'" in info.value.hint


def test_an_order_resolves_the_overlap_first_set_wins(tiny):
    _, _, sets = tiny
    ag = compose_sets([sets["alpha"], sets["gamma"]], overlap="first")
    assert ag.manifest.experts == {0: [1, 3, 4], 1: [0, 5]}
    assert ag.manifest.expert_digests["0.3"] == sets["alpha"].manifest.expert_digests["0.3"]
    ga = compose_sets([sets["gamma"], sets["alpha"]], overlap="first")
    assert ga.manifest.expert_digests["0.3"] == sets["gamma"].manifest.expert_digests["0.3"]


def test_a_set_composed_with_itself_or_alone_is_refused(tiny):
    _, _, sets = tiny
    with pytest.raises(CompositionError, match="composed with itself"):
        compose_sets([sets["alpha"], sets["alpha"]], names=["alpha", "alpha@1"])
    with pytest.raises(CompositionError, match="at least two"):
        compose_sets([sets["alpha"]])


def test_composed_patch_equals_applying_both_sets(tiny):
    import torch

    from expertlib.apply import apply_expert_set

    _, model, sets = tiny
    ids = torch.tensor([[5, 9, 11, 3, 7, 2, 8]])
    with torch.no_grad():
        with apply_expert_set(model, sets["alpha"]), apply_expert_set(model, sets["beta"]):
            want = model(ids).logits
        with apply_expert_set(model, compose_sets([sets["alpha"], sets["beta"]])):
            got = model(ids).logits
        base = model(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, base)  # the sets change the answer


def test_compose_cli_writes_a_publishable_patch(tiny, tmp_path):
    from expertlib.cli.main import cli
    from expertlib.registry import Registry

    root, _, sets = tiny
    a, b = (sets[n].save(tmp_path / f"{n}.safetensors") for n in ("alpha", "beta"))
    out = tmp_path / "ab.safetensors"
    res = CliRunner().invoke(cli, ["compose", str(a), str(b), "--task", "ab", "-o", str(out)])
    assert res.exit_code == 0, res.output
    es = ExpertSet.open(out)
    assert es.manifest.task == "ab" and es.manifest.num_experts == 8
    reg = Registry(tmp_path / "registry")
    reg.publish(out, base=root / "base")
    assert [e.ref.name for e in reg.list()] == ["ab"]
    res = CliRunner().invoke(cli, ["compose", str(a), str(tmp_path / "missing.safetensors"), "--task", "x"])
    assert res.exit_code == 2 and "missing.safetensors" in res.output
    g = sets["gamma"].save(tmp_path / "gamma.safetensors")
    res = CliRunner().invoke(
        cli, ["compose", str(a), str(g), "--task", "ag", "-o", str(tmp_path / "ag.safetensors")]
    )
    assert res.exit_code == 2 and "layer 0 expert 3" in res.output


# --- served ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pytest.importorskip("vllm")
    from served_world import Reference, build, serve

    from expertlib.moe import load_model
    from expertlib.registry import Registry
    from expertlib.vllm_plugin.testing import random_expert_set

    root = tmp_path_factory.mktemp("compose-served")
    base_dir, sets = build(root)
    sets["gamma"] = random_expert_set(load_model(base_dir), "gamma", GAMMA, seed=9, scale=2.0)
    Registry(root / "registry").publish(sets["gamma"].save(root / "gamma.safetensors"), base=base_dir)
    sets["alpha+beta"] = compose_sets([sets["alpha"], sets["beta"]])
    sets["alpha>gamma"] = compose_sets([sets["alpha"], sets["gamma"]], overlap="first")
    ref = Reference(base_dir, sets)
    with serve(root, base_dir) as url:
        yield dict(url=url, ref=ref)


def _complete(world, model: str, prompt: str = "The cat sat on the mat", max_tokens: int = 8):
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return httpx.post(world["url"] + "/v1/completions", json=body, timeout=120)


@pytest.mark.vllm
@pytest.mark.slow
def test_served_composition_equals_the_merged_patch(world):
    ref = world["ref"]
    prompt = "The cat sat on the mat"
    ids = ref.tok(prompt).input_ids
    want = ref.greedy(ids, "alpha+beta", 8)
    assert want != ref.greedy(ids, "alpha", 8) and want != ref.greedy(ids, "beta", 8)
    models = ("alpha+beta", "alpha@1+beta@1", "tiny-moe:alpha+beta", "alpha+beta")
    # the composition's first requests, all at once: none may find it being loaded and get a 404
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: _complete(world, m, prompt), models))
    for model, r in zip(models, answers, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        assert r.json()["choices"][0]["text"] == ref.tok.decode(want)
    cards = {c["id"]: c for c in httpx.get(world["url"] + "/v1/models", timeout=30).json()["data"]}
    assert cards["alpha@1+beta@1"]["state"] == "resident"  # one set, under the parts' served names
    assert "alpha+beta" in cards["alpha@1+beta@1"]["aliases"]
    # an order resolves an overlap: alpha's expert 3 of layer 0 wins over gamma's
    r = _complete(world, "alpha>gamma", prompt)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref.tok.decode(ref.greedy(ids, "alpha>gamma", 8))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "status", "says"),
    [
        ("alpha+nope", 404, "'nope'"),
        ("alpha+alpha", 400, "composed with itself"),
        ("alpha+alpha@1", 400, "composed with itself"),
        ("alpha+gamma", 400, "layer 0 expert 3"),
        ("alpha+", 400, "empty part"),
        ("alpha+beta>gamma", 400, "mixes"),
    ],
)
def test_bad_compositions_are_clear_errors(world, model, status, says):
    r = _complete(world, model)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
