"""The engines' shared bookkeeping without vLLM: the one load/unload transaction both engines run
(`_SetBook.load`/`unload` over a stand-in for collective_rpc) and the SetRef a request carries."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from expertlib.engine import _run_now, _SetBook
from expertlib.errors import NotLoadedError
from expertlib.slots import SetRef


class Workers:
    """Records the collective_rpc calls; `fail` makes the next expertlib_apply with fills raise."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.fail = False

    async def __call__(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        if method == "expertlib_apply" and self.fail and len(args) > 1:
            self.fail = False
            raise RuntimeError("worker died")
        return [{"hits": 0, "paths": []}]


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    from expertlib.checkpoint import BaseCheckpoint
    from expertlib.moe import load_model
    from expertlib.vllm_plugin.testing import random_expert_set

    base_dir = tiny_model_dir("qwen2_moe")
    base = BaseCheckpoint(base_dir)
    model = load_model(base_dir)
    root = tmp_path_factory.mktemp("sets")
    layers = base.moe_layers
    sets = {
        name: random_expert_set(model, name, {layer: experts for layer in layers}, seed=i).save(
            root / f"{name}.safetensors"
        )
        for i, (name, experts) in enumerate([("a", [0, 1]), ("b", [2, 3]), ("c", [4, 5])])
    }
    return base, sets


def _load(book: _SetBook, rpc: Workers, path, name: str, pin: bool = False) -> str:
    es, name, file = book.open(path, name)
    return _run_now(book.load(es, name, file, pin, rpc))


def test_load_and_unload_send_one_apply_each_in_slot_indices(world):
    base, sets = world
    book, rpc = _SetBook(base, 4, 2), Workers()
    assert _load(book, rpc, sets["a"], "a") == "a"
    method, (clear, path, fills, set_row, remap, digest, checked) = rpc.calls[0]
    assert method == "expertlib_apply" and clear == [] and path == str(sets["a"]) and set_row == 1
    layer = base.moe_layers[0]
    assert remap[layer] == {0: 0, 1: 1}  # expert -> slot index, as Placement.remap
    assert sorted(f[2] for f in fills if f[0] == layer) == [0, 1]
    assert digest == book.sets["a"].manifest.content_digest
    assert json.loads(checked)["path"] == str(Path(sets["a"]).resolve())  # the workers trust this check
    assert book.history["a"]["loads"] == 1
    rpc.calls.clear()
    _run_now(book.unload("a", rpc))
    assert rpc.calls == [("expertlib_apply", ([1],))] and "a" not in book.pool


def test_a_failed_apply_rolls_back_the_book_and_clears_the_row(world):
    base, sets = world
    book, rpc = _SetBook(base, 4, 2), Workers()
    rpc.fail = True
    with pytest.raises(RuntimeError, match="worker died"):
        _load(book, rpc, sets["a"], "a")
    assert "a" not in book.pool and "a" not in book.sets
    assert rpc.calls[-1] == ("expertlib_apply", ([1],))  # the row is cleared on the workers too
    assert _load(book, rpc, sets["a"], "a") == "a" and book.pool.row_of("a") == 1  # nothing leaked


def test_eviction_clears_the_evicted_row_in_the_same_apply(world):
    base, sets = world
    book, rpc = _SetBook(base, 4, 2), Workers()
    _load(book, rpc, sets["a"], "a")
    _load(book, rpc, sets["b"], "b")
    _load(book, rpc, sets["c"], "c")  # 4 slots per layer: a (least recently used) goes
    clear, *_rest = rpc.calls[-2][1]
    assert clear == [1] and book.pool.loaded() == ["b", "c"] and book.history["a"]["evictions"] == 1


def test_a_set_ref_is_resolved_once_and_checked_later(world):
    base, sets = world
    book, rpc = _SetBook(base, 4, 2), Workers()
    _load(book, rpc, sets["a"], "a")
    ref = book.ref("a")
    assert ref == SetRef("a", book.sets["a"].manifest.content_digest, 1)
    assert ref.cache_salt == f"expertlib:{ref.digest}" and book.ref(None) is None
    assert book.ref(ref) is ref  # still resident in its row: the value itself
    _run_now(book.unload("a", rpc))
    with pytest.raises(NotLoadedError):
        book.ref(ref)
    _load(book, rpc, sets["b"], "b")
    _load(book, rpc, sets["a"], "a")  # back, in another row
    moved = book.ref(ref)
    assert moved.set_row == 2 and moved.digest == ref.digest and moved.name == "a"
    _run_now(book.unload("a", rpc))
    _load(book, rpc, sets["c"], "a")  # other tensors under the same name
    with pytest.raises(NotLoadedError, match="replaced by another set"):
        book.ref(ref)


def test_the_async_engine_runs_the_same_transaction(world):
    """AsyncExpertEngine.load/unload go through _SetBook.load/unload with its collective_rpc."""
    from expertlib.engine import AsyncExpertEngine

    base, sets = world
    rpc = Workers()

    class Core:  # the part of vLLM's AsyncLLM the engine calls for loads
        async def collective_rpc(self, method, args=()):
            if method == "expertlib_info":
                return [dict(num_experts=base.num_experts, slots=4, max_sets=2, moe_layers=base.moe_layers)]
            return await rpc(method, args)

    async def run():
        engine = AsyncExpertEngine(Core(), base, 4, 2)
        assert await engine.load(sets["a"]) == "a"
        assert engine.ref("a").set_row == 1
        await engine.unload("a")
        return [m for m, _ in rpc.calls]

    calls = asyncio.run(run())
    assert calls == ["expertlib_host_cache", "expertlib_apply", "expertlib_host_cache", "expertlib_apply"]
