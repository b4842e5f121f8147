"""Slot accounting (SlotPool) and the transformers composer: mixed batches equal single-set runs."""

from __future__ import annotations

import copy

import pytest
import torch

from expertlib.apply import apply_expert_set, extract_expert_set
from expertlib.compose import compose
from expertlib.errors import BaseMismatchError, NotLoadedError, SlotError
from expertlib.moe import load_model, moe_layer_indices, read_expert, write_expert
from expertlib.slots import SlotPool


def _digests(expert_map, tag):
    return {f"{layer}.{e}": f"{tag}-{layer}-{e}" for layer, ids in expert_map.items() for e in ids}


def test_pool_places_and_releases():
    pool = SlotPool([0, 1], num_experts=8, slots_per_layer=3, max_sets=2)
    a = pool.place("a", {0: [1, 2], 1: [5]}, _digests({0: [1, 2], 1: [5]}, "a"))
    assert a.set_row == 1
    assert a.remap == {0: {1: 0, 2: 1}, 1: {5: 0}}  # expert -> slot
    assert sorted(a.fills) == [(0, 0, 1), (0, 1, 2), (1, 0, 5)]
    assert pool.status()["slots_used"] == {0: 2, 1: 1}
    freed = pool.release("a")
    assert sorted(freed) == [(0, 0), (0, 1), (1, 0)]
    assert pool.status()["slots_used_total"] == 0 and pool.loaded() == []


def test_pool_dedups_identical_experts():
    pool = SlotPool([0], num_experts=8, slots_per_layer=2, max_sets=4)
    pool.place("a", {0: [1]}, {"0.1": "same"})
    b = pool.place("b", {0: [1, 3]}, {"0.1": "same", "0.3": "other"})
    assert b.fills == [(0, 1, 3)]  # expert 1 shares a's slot, only expert 3 is copied
    assert b.remap == {0: {1: 0, 3: 1}}
    pool.release("a")
    assert pool.status()["slots_used"] == {0: 2}  # still referenced by b
    pool.release("b")
    assert pool.status()["slots_used"] == {0: 0}


def test_pool_evicts_lru_unpinned_and_respects_pins():
    pool = SlotPool([0], num_experts=8, slots_per_layer=2, max_sets=8)
    pool.place("a", {0: [1]}, {"0.1": "a"})
    pool.place("b", {0: [2]}, {"0.2": "b"})
    pool.touch("a")  # b is now least recently used
    c = pool.place("c", {0: [3]}, {"0.3": "c"})
    assert c.evicted == ["b"] and sorted(pool.loaded()) == ["a", "c"]
    pool.pin("a")
    pool.pin("c")
    with pytest.raises(SlotError, match="every resident set is pinned"):
        pool.place("d", {0: [4]}, {"0.4": "d"})
    with pytest.raises(SlotError, match="only 2 slots"):
        pool.place("huge", {0: [1, 2, 3]}, {})


def test_pool_runs_out_of_rows():
    pool = SlotPool([0], num_experts=8, slots_per_layer=8, max_sets=1)
    pool.place("a", {0: [1]}, {"0.1": "a"})
    b = pool.place("b", {0: [2]}, {"0.2": "b"})
    assert b.evicted == ["a"] and b.set_row == 1
    with pytest.raises(NotLoadedError):
        pool.row_of("a")


def _sets(base, n, arch_layers, seed=0):
    out = []
    for i in range(n):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(seed + i)
        experts = {layer: sorted({(i + j) % 8 for j in range(2)}) for layer in arch_layers}
        for layer, ids in experts.items():
            for e in ids:
                w = read_expert(base, layer, e)
                write_expert(
                    tuned, layer, e, w.map(lambda t, g=g: t + 0.5 * torch.randn(t.shape, generator=g))
                )
        out.append((extract_expert_set(tuned, base, task=f"task{i}", experts=experts), tuned))
    return out


def test_composed_mixed_batch_equals_single_runs(arch, tiny_model_dir):
    base = load_model(tiny_model_dir(arch))
    sets = _sets(base, 4, moe_layer_indices(base))
    x = torch.randint(4, 90, (5, 9))
    with torch.no_grad():
        want = [tuned(x[i : i + 1]).logits for i, (_, tuned) in enumerate(sets)]
        want.append(base(x[4:5]).logits)
        composed = compose(base, [es for es, _ in sets], slots=8, max_sets=4)
        mixed = composed(x, expert_sets=["task0", "task1", "task2", "task3", None]).logits
    for i in range(5):
        torch.testing.assert_close(mixed[i : i + 1], want[i], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[4])


def test_composed_generate_matches_in_place(tiny_model_dir):
    base = load_model(tiny_model_dir("qwen2_moe"))
    ((es, _),) = _sets(base, 1, moe_layer_indices(base), seed=7)
    x = torch.randint(4, 90, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), apply_expert_set(base, es):
        want = base.generate(x, **kw)
    base_out = base.generate(x, **kw)
    composed = compose(base, [es])
    got = composed.generate(x, expert_sets=["task0", None], **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], base_out[1])


def test_composer_refuses_and_evicts(tiny_model_dir):
    base = load_model(tiny_model_dir("qwen2_moe"))
    other = load_model(tiny_model_dir("qwen2_moe", seed=3))
    sets = _sets(base, 3, moe_layer_indices(base))
    composed = compose(other)
    with pytest.raises(BaseMismatchError):
        composed.load(sets[0][0])
    composed = compose(base, slots=4, max_sets=4)
    for es, _ in sets:
        composed.load(es)
    # 3 sets x 2 experts per layer > 4 slots: the oldest was evicted; its row now reads as the base
    assert composed.loaded() == ["task1", "task2"]
    with pytest.raises(NotLoadedError, match="task0"):
        composed(torch.ones(1, 3, dtype=torch.long), expert_sets=["task0"])
    composed.pin("task1")
    composed.load(sets[0][0])
    assert sorted(composed.loaded()) == ["task0", "task1"]
    composed.unload("task0")
    assert composed.loaded() == ["task1"]
