"""The composer on vLLM (offline engine): expert sets in slots give exactly the outputs of the set
applied in place in transformers, alone and in mixed batches; eviction, pinning, dedup, refusals."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.apply import apply_expert_set  # noqa: E402
from expertlib.errors import BaseMismatchError, NotLoadedError, SlotError  # noqa: E402
from expertlib.moe import load_model  # noqa: E402
from expertlib.vllm_plugin.testing import hf_greedy, make_vllm_tiny_base, random_expert_set  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["Hello world", "The cat sat on", "2+2=", "def f(x):", "Q: why?"]
MAX_TOKENS = 32
ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=8)


def greedy(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny qwen2_moe base, its transformers model, five random sets, and one engine on it."""
    from served_world import SETS, build

    from expertlib.engine import ExpertEngine

    root = tmp_path_factory.mktemp("vllm-engine")
    maps = {**SETS, "gamma": {0: [0, 4, 6]}, "delta": {1: [2]}, "eps": {0: [5, 7], 1: [4]}}
    base_dir, sets = build(root, maps, scale=None, publish=())  # files only, random_expert_set's scale
    model = load_model(base_dir)
    paths = {name: root / f"{name}.safetensors" for name in sets}
    engine = ExpertEngine(base_dir, slots=6, max_sets=6, **ENGINE_KW)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    yield dict(root=root, base_dir=base_dir, model=model, sets=sets, paths=paths, engine=engine, tok=tok)


def reset(engine):
    for name in engine.loaded_sets():
        engine.unload(name)


def test_slot_rows_start_zeroed_and_base_untouched(world):
    """Unused slot rows hold zeros (never uninitialised memory); loads never change base experts."""
    engine = world["engine"]
    assert engine.loaded_sets() == []  # runs first, on the fresh engine

    def inspect(worker):
        ctx = worker.model_runner.get_model().expertlib_slots
        out = {}
        for layer, runner in ctx.layers.items():
            w13 = runner.routed_experts.w13_weight
            out[layer] = (bool(w13[ctx.num_experts :].abs().sum() == 0), w13[: ctx.num_experts].sum().item())
        return out

    before = engine.llm.collective_rpc(inspect)[0]
    engine.load(world["paths"]["alpha"])
    engine.unload("alpha")
    after = engine.llm.collective_rpc(inspect)[0]
    assert all(zero for zero, _ in before.values())
    assert all(before[layer][1] == after[layer][1] for layer in before)  # base rows identical


def test_set_output_equals_transformers_with_set_applied(world):
    engine, model, tok = world["engine"], world["model"], world["tok"]
    reset(engine)
    assert engine.load(world["paths"]["alpha"]) == "alpha"
    engine.load(world["sets"]["beta"])  # in-memory ExpertSet
    prompts = PROMPTS[:2]
    got_base = tokens(engine.generate(prompts, None, greedy()))
    assert got_base == [hf_greedy(model, tok, p, MAX_TOKENS) for p in prompts]
    for name in ("alpha", "beta"):
        got = tokens(engine.generate(prompts, name, greedy()))
        with apply_expert_set(model, world["sets"][name]):
            want = [hf_greedy(model, tok, p, MAX_TOKENS) for p in prompts]
        assert got == want, name
        assert got != got_base, f"set {name} should change the output"


def test_mixed_batch_equals_each_request_alone(world):
    engine = world["engine"]
    reset(engine)
    for name in ("alpha", "beta", "gamma", "delta"):
        engine.load(world["paths"][name])
    assert sorted(engine.loaded_sets()) == ["alpha", "beta", "delta", "gamma"]
    names = ["alpha", "beta", None, "gamma", "delta"]
    prompts = [p for p in PROMPTS for _ in names]
    sets = [s for _ in PROMPTS for s in names]
    mixed = tokens(engine.generate(prompts, sets, greedy()))
    alone = [tokens(engine.generate([p], s, greedy()))[0] for p, s in zip(prompts, sets, strict=True)]
    assert mixed == alone
    assert len({tuple(t) for t in mixed[: len(names)]}) == len(names), "every set gives its own output"


def test_eviction_pinning_dedup(world):
    engine, sets = world["engine"], world["sets"]
    reset(engine)
    engine.load(world["paths"]["alpha"], pin=True)  # layer 0: 2 slots, layer 1: 2 slots
    engine.load(world["paths"]["beta"])  # layer 0: 1, layer 1: 3 -> layer 1 has 1 free
    engine.load(world["paths"]["gamma"])  # layer 0: 3 -> layer 0 full
    alone_gamma = tokens(engine.generate(PROMPTS[:1], "gamma", greedy()))
    engine.generate(PROMPTS[:1], "beta", greedy())  # beta is now more recent than gamma
    used = engine.status()["slots_used"]
    assert used == {0: 6, 1: 5}

    # dedup: same experts under another name take no new slots and give the same output
    engine.load(world["paths"]["gamma"], name="gamma-copy")
    assert engine.status()["slots_used"] == used
    assert tokens(engine.generate(PROMPTS[:1], "gamma-copy", greedy())) == alone_gamma

    # eps needs 2 slots in layer 0: the least recently used unpinned sets go, alpha (pinned) stays
    engine.load(world["paths"]["eps"])
    loaded = set(engine.loaded_sets())
    assert "alpha" in loaded and "eps" in loaded and "gamma" not in loaded
    st = engine.status()
    assert st["sets"]["alpha"]["pinned"] is True
    with pytest.raises(NotLoadedError):
        engine.generate(PROMPTS[:1], "gamma", greedy())
    # the survivors still compute with their own experts
    model, tok = world["model"], world["tok"]
    with apply_expert_set(model, sets["eps"]):
        want = hf_greedy(model, tok, PROMPTS[0], MAX_TOKENS)
    assert tokens(engine.generate(PROMPTS[:1], "eps", greedy()))[0] == want

    # everything pinned and no room: a clear error, nothing changes
    for name in engine.loaded_sets():
        engine.pin(name)
    before = engine.status()
    with pytest.raises(SlotError):
        engine.load(world["paths"]["gamma"])
    assert engine.status()["slots_used"] == before["slots_used"]


def test_a_reload_copies_packed_rows_from_the_host_cache(world, monkeypatch):
    """A set loaded again after it left the slots comes from the workers' host cache, already in the
    kernel's layout: no file read, no check, no packing, one copy per part; it answers as before."""
    import expertlib.vllm_plugin.worker as worker

    engine = world["engine"]
    reset(engine)
    engine.load(world["paths"]["alpha"])
    want = tokens(engine.generate(PROMPTS[:2], "alpha", greedy()))
    engine.unload("alpha")
    packed = []
    original = worker.pack_set
    monkeypatch.setattr(worker, "pack_set", lambda ctx, es: packed.append(es) or original(ctx, es))
    hits = engine.status()["host_cache"]["hits"]
    engine.load(world["paths"]["alpha"])
    assert packed == [] and engine.status()["host_cache"]["hits"] == hits + 1
    assert tokens(engine.generate(PROMPTS[:2], "alpha", greedy())) == want


def test_a_never_seen_set_is_packed_straight_into_its_slots(world, monkeypatch, tmp_path):
    """A set neither cache holds is packed straight into its slots (no host rows packed first), answers
    exactly as the set applied in transformers, and copies of its rows are then kept in the host cache
    (a reload is a hit) and written to the packed-set cache."""
    import expertlib.vllm_plugin.worker as worker
    from expertlib.vllm_plugin.hostcache import HOST_CACHE
    from expertlib.vllm_plugin.packcache import PACKED_CACHE

    engine, model, tok = world["engine"], world["model"], world["tok"]
    reset(engine)
    PACKED_CACHE.flush()
    monkeypatch.setattr(PACKED_CACHE, "_root", tmp_path / "packed")
    monkeypatch.setattr(PACKED_CACHE, "_budget", 1 << 30)
    budget = HOST_CACHE.budget
    HOST_CACHE.resize(0)
    HOST_CACHE.resize(budget)
    packed = []
    original = worker.pack_set
    monkeypatch.setattr(worker, "pack_set", lambda ctx, es: packed.append(es) or original(ctx, es))
    misses = HOST_CACHE.misses
    engine.load(world["paths"]["gamma"])
    assert packed == [] and HOST_CACHE.misses == misses + 1  # packed into the slots, rows kept after
    got = tokens(engine.generate(PROMPTS[:2], "gamma", greedy()))
    with apply_expert_set(model, world["sets"]["gamma"]):
        assert got == [hf_greedy(model, tok, p, MAX_TOKENS) for p in PROMPTS[:2]]
    PACKED_CACHE.flush()
    assert PACKED_CACHE.status()["entries"] == 1
    engine.unload("gamma")
    hits = HOST_CACHE.hits
    engine.load(world["paths"]["gamma"])
    assert HOST_CACHE.hits == hits + 1 and packed == []
    assert tokens(engine.generate(PROMPTS[:2], "gamma", greedy())) == got
    reset(engine)


def test_a_set_packed_before_loads_from_the_packed_cache(world, monkeypatch, tmp_path):
    """With the host cache emptied (a new process), a set packed before is read from the packed-set
    disk cache straight into its slots (no set file read, no packing) and answers as when it was
    packed; a cache file changed since it was written (its mtime set back) is refused, removed and the
    set packed again from its checked file, answering the same."""
    import expertlib.vllm_plugin.worker as worker
    from expertlib.vllm_plugin.hostcache import HOST_CACHE
    from expertlib.vllm_plugin.packcache import PACKED_CACHE

    engine, path = world["engine"], world["paths"]["beta"]
    reset(engine)
    PACKED_CACHE.flush()
    monkeypatch.setattr(PACKED_CACHE, "_root", tmp_path / "packed")
    monkeypatch.setattr(PACKED_CACHE, "_budget", 1 << 30)
    budget = HOST_CACHE.budget

    def load_afresh() -> None:
        for name in engine.loaded_sets():
            engine.unload(name)
        HOST_CACHE.resize(0)  # what a new server process starts with
        HOST_CACHE.resize(budget)
        engine.load(path)
        PACKED_CACHE.flush()

    load_afresh()  # packed from the set file, written to the disk cache
    want = tokens(engine.generate(PROMPTS[:3], "beta", greedy()))
    assert PACKED_CACHE.status()["entries"] == 1
    packed = []  # packings of either kind: into host rows, or straight into the slots
    original, into_slots = worker.pack_set, worker.pack_into_slots
    monkeypatch.setattr(worker, "pack_set", lambda ctx, es: packed.append(es) or original(ctx, es))
    monkeypatch.setattr(
        worker,
        "pack_into_slots",
        lambda ctx, es, *a, **kw: packed.append(es) or into_slots(ctx, es, *a, **kw),
    )
    hits = PACKED_CACHE.hits
    load_afresh()
    assert packed == [] and PACKED_CACHE.hits == hits + 1
    assert tokens(engine.generate(PROMPTS[:3], "beta", greedy())) == want

    data = next((tmp_path / "packed").glob("*.bin"))
    st, raw = data.stat(), bytearray(data.read_bytes())
    raw[: len(raw) // 2] = bytes(len(raw) // 2)  # half the rows zeroed
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    refused = PACKED_CACHE.refused
    load_afresh()
    assert len(packed) == 1 and PACKED_CACHE.refused == refused + 1
    assert tokens(engine.generate(PROMPTS[:3], "beta", greedy())) == want
    assert PACKED_CACHE.status()["entries"] == 1  # written again from the fresh packing
    reset(engine)


def test_a_set_file_written_while_it_loads_is_refused(world, tmp_path, monkeypatch):
    """A load packs straight from a memory map of the set file, which shows later writes: a write
    while it packs (the file's mtime and ctime move) fails the load, nothing of it serves; once the
    file is checked again in its new state it loads."""
    import shutil

    from expertlib.vllm_plugin import worker
    from expertlib.vllm_plugin.hostcache import HOST_CACHE
    from expertlib.vllm_plugin.packcache import PACKED_CACHE

    engine = world["engine"]
    reset(engine)
    path = tmp_path / "beta.safetensors"
    shutil.copy(world["paths"]["beta"], path)
    monkeypatch.setattr(PACKED_CACHE, "enabled", False)  # packed from the file, not read from the cache
    budget = HOST_CACHE.budget
    HOST_CACHE.resize(0)
    HOST_CACHE.resize(budget)
    original = worker.pack_into_slots
    packed = []

    def written_meanwhile(ctx, es, *args, **kwargs):
        os.utime(path)  # a write: mtime and ctime move (the bytes are the map's business)
        packed.append(es)
        return original(ctx, es, *args, **kwargs)

    monkeypatch.setattr(worker, "pack_into_slots", written_meanwhile)
    with pytest.raises(Exception, match="changed while it was loaded"):
        engine.load(path)
    assert packed and engine.loaded_sets() == []
    monkeypatch.setattr(worker, "pack_into_slots", original)
    engine.load(path)  # checked again in its new state
    assert engine.loaded_sets() == ["beta"]
    reset(engine)


def test_set_that_cannot_fit_is_refused(world, tmp_path):
    engine = world["engine"]
    reset(engine)
    too_big = random_expert_set(world["model"], "big", {0: list(range(7))}, seed=9)
    with pytest.raises(SlotError, match="only 6 slots"):
        engine.load(too_big)
    assert engine.loaded_sets() == []


def test_refuses_set_for_another_base(world, tmp_path):
    engine = world["engine"]
    # same architecture and config, other weights: caught by the base expert digests
    other_dir = tmp_path / "other"
    make_vllm_tiny_base("qwen2_moe", other_dir, seed=7)
    other = load_model(other_dir)
    foreign = random_expert_set(other, "foreign", {0: [1]}, seed=3)
    with pytest.raises(BaseMismatchError, match="differs from the base"):
        engine.load(foreign)
    # another config: caught by the config identity
    bigger_dir = tmp_path / "bigger"
    make_vllm_tiny_base("qwen2_moe", bigger_dir, num_experts=16)
    bigger = load_model(bigger_dir)
    with pytest.raises(BaseMismatchError, match="was made for"):
        engine.load(random_expert_set(bigger, "bigger", {0: [1]}))
    assert "foreign" not in engine.loaded_sets() and "bigger" not in engine.loaded_sets()


def test_unknown_set_name(world):
    engine = world["engine"]
    with pytest.raises(NotLoadedError):
        engine.generate(PROMPTS[:1], "no-such-set", greedy())
    with pytest.raises(NotLoadedError):
        engine.unload("no-such-set")


def test_prefix_cache_never_shared_across_sets(world, monkeypatch):
    """A long prompt cached under the base must not feed its KV blocks to a request for a set."""
    from vllm import SamplingParams

    from expertlib.engine import requests

    engine = world["engine"]
    reset(engine)
    heavy = random_expert_set(world["model"], "heavy", {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, seed=11, scale=1.0)
    engine.load(heavy)
    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # > one 128-token KV block
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = tokens(engine.generate([prompt], "heavy", params))[0]  # nothing cached yet
    engine.generate([prompt], None, params)  # caches the prompt's blocks under the base
    again = engine.generate([prompt], "heavy", params)[0]
    assert list(again.outputs[0].token_ids) == want
    # the test can fail: without the per-set salt the set's request reuses the base's cached blocks
    monkeypatch.setattr(requests, "salted", lambda p, salt: p)
    engine.generate([prompt], None, params)
    leaked = engine.generate([prompt], "heavy", params)[0]
    assert leaked.num_cached_tokens > 0 and list(leaked.outputs[0].token_ids) != want
