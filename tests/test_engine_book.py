"""The engines' shared bookkeeping without vLLM: the one load/unload transaction both engines run
(`SetBook.load`/`unload` over a stand-in for collective_rpc) and the SetRef a request carries."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from expertlib.engine.book import STAGE_WAIT_S, SetBook
from expertlib.engine.offline import _run_now
from expertlib.errors import NotLoadedError
from expertlib.slots import SetRef


class Workers:
    """Records the collective_rpc calls; `fail` makes the next load job (read, pack, slot copies)
    raise; `busy` is how many times a background job answers "not done yet" before it is."""

    def __init__(self, busy: int = 0):
        self.calls: list[tuple[str, tuple]] = []
        self.fail = False
        self.busy = busy

    async def __call__(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        if method == "expertlib_stage":
            if self.fail:
                self.fail = False
                raise RuntimeError("worker died")
            if self.busy > 0:
                self.busy -= 1
                return [False]
            return [True]
        return [{"hits": 0, "paths": []}]

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


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


def _load(book: SetBook, rpc: Workers, path, name: str, pin: bool = False) -> str:
    return _run_now(book.load(book.open(path, name), pin, rpc))


def test_load_stages_writes_then_sets_the_row_in_slot_indices(world):
    base, sets = world
    book, rpc = SetBook(base, 4, 2), Workers()
    assert _load(book, rpc, sets["a"], "a") == "a"
    assert rpc.methods() == [
        "expertlib_stage",
        "expertlib_apply",
        "expertlib_unstage",  # which also reports the host cache
    ]
    path, digest, checked, background, fills, wait = rpc.calls[0][1]
    assert path == str(sets["a"]) and background is False  # the offline engine runs the job inline
    assert wait == 0.0
    assert digest == book.sets["a"].digest
    assert json.loads(checked)["path"] == str(Path(sets["a"]).resolve())  # the workers trust this check
    layer = base.moe_layers[0]
    assert sorted(f[2] for f in fills if f[0] == layer) == [0, 1]  # the job copies them into slots
    clear, _, _, set_row, remap = rpc.calls[1][1]
    assert clear == [] and set_row == 1
    assert remap[layer] == {0: 0, 1: 1}  # expert -> slot index, as Placement.remap
    assert book.history["a"]["loads"] == 1
    rpc.calls.clear()
    _run_now(book.unload("a", rpc))
    assert rpc.calls == [("expertlib_apply", ([1],))] and "a" not in book.pool


def test_a_failed_write_rolls_back_the_book_and_clears_the_row(world):
    base, sets = world
    book, rpc = SetBook(base, 4, 2), Workers()
    rpc.fail = True
    with pytest.raises(RuntimeError, match="worker died"):
        _load(book, rpc, sets["a"], "a")
    assert "a" not in book.pool and "a" not in book.sets and not book.loading
    assert ("expertlib_apply", ([1],)) in rpc.calls  # the row is cleared on the workers too
    assert rpc.methods()[-1] == "expertlib_unstage"  # and the staged bytes let go
    assert _load(book, rpc, sets["a"], "a") == "a" and book.pool.row_of("a") == 1  # nothing leaked


def test_eviction_clears_the_evicted_row_before_its_slots_are_written(world):
    base, sets = world
    book, rpc = SetBook(base, 4, 2), Workers()
    _load(book, rpc, sets["a"], "a")
    _load(book, rpc, sets["b"], "b")
    rpc.calls.clear()
    _load(book, rpc, sets["c"], "c")  # 4 slots per layer: a (least recently used) goes
    assert rpc.methods()[:3] == ["expertlib_apply", "expertlib_stage", "expertlib_apply"]
    assert rpc.calls[0][1] == ([1],)  # cleared before the job writes a's slots
    assert book.pool.loaded() == ["b", "c"] and book.history["a"]["evictions"] == 1


def test_a_set_serves_only_once_its_slots_are_written(world):
    """The row is written after the workers' job (read, check, pack, slot copies) is done; until then
    a request for the set is told it is being loaded rather than served with a half-written set."""
    base, sets = world
    book = SetBook(base, 4, 2)

    class Probe(Workers):
        async def __call__(self, method, args=()):
            if method == "expertlib_stage":
                with pytest.raises(NotLoadedError, match="being loaded"):
                    book.ref("a")
            return await super().__call__(method, args)

    rpc = Probe(busy=2)  # the job answers "not yet" twice
    requests = iter([0, 1, 0])  # requests running at each poll

    async def load():
        async def pause():
            pass

        return await book.load(book.open(sets["a"], "a"), False, rpc, pause, lambda: next(requests) == 0)

    asyncio.run(load())
    assert rpc.methods()[:4] == ["expertlib_stage"] * 3 + ["expertlib_apply"]
    assert all(a[3] is True for m, a in rpc.calls if m == "expertlib_stage")  # on a worker thread
    # a poll may wait for the job only while no request runs (then it holds up no forward step)
    assert [a[5] for m, a in rpc.calls if m == "expertlib_stage"] == [STAGE_WAIT_S, 0.0, STAGE_WAIT_S]
    assert book.ref("a").set_row == 1


def test_a_set_ref_is_resolved_once_and_checked_later(world):
    base, sets = world
    book, rpc = SetBook(base, 4, 2), Workers()
    _load(book, rpc, sets["a"], "a")
    ref = book.ref("a")
    assert ref == SetRef("a", book.sets["a"].digest, 1)
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
    """AsyncExpertEngine.load/unload go through SetBook.load/unload with its collective_rpc."""
    from expertlib.engine import AsyncExpertEngine

    base, sets = world
    rpc = Workers()

    rpc.busy = 3  # the workers' background read answers "not yet" three times

    class Core:  # the part of vLLM's AsyncLLM the engine calls for loads
        async def collective_rpc(self, method, args=()):
            if method == "expertlib_info":
                return [
                    dict(
                        num_experts=base.num_experts,
                        slots=4,
                        max_sets=2,
                        moe_layers=base.moe_layers,
                        weight_absmax=[],
                    )
                ]
            return await rpc(method, args)

    async def run():
        engine = AsyncExpertEngine(Core(), base, 4, 2)
        assert await engine.load(sets["a"]) == "a"
        assert engine.ref("a").set_row == 1
        await engine.unload("a")
        return rpc.methods()

    calls = asyncio.run(run())
    assert calls == ["expertlib_host_cache"] + ["expertlib_stage"] * 4 + [
        "expertlib_apply",
        "expertlib_unstage",
        "expertlib_apply",
    ]
    assert all(args[3] is True for m, args in rpc.calls if m == "expertlib_stage")  # in the background


def _async_engine(base, rpc: Workers, max_sets: int):
    from expertlib.engine import AsyncExpertEngine

    class Core:  # the part of vLLM's AsyncLLM the engine calls for loads
        async def collective_rpc(self, method, args=()):
            if method == "expertlib_info":
                info = dict(num_experts=base.num_experts, slots=4, max_sets=max_sets)
                return [dict(info, moe_layers=base.moe_layers, weight_absmax=[])]
            return await rpc(method, args)

    return AsyncExpertEngine(Core(), base, 4, max_sets)


def test_a_request_waits_for_a_slot_instead_of_failing(world):
    """Every resident set pinned: a request's on-demand load waits in the queue until one is
    unpinned (or its last request ends), then evicts it and loads; past its wait, 503."""
    from expertlib.errors import ServerBusyError
    from expertlib.server.sets import SetCatalog

    base, sets = world

    async def run():
        engine = _async_engine(base, Workers(), max_sets=1)
        catalog = SetCatalog(engine, "tiny")
        await engine.load(sets["a"], pin=True)
        waiting = asyncio.create_task(catalog._load_on_demand(str(sets["b"])))
        await asyncio.sleep(0.2)
        assert not waiting.done() and engine.loaded_sets() == ["a"]  # waiting, not refused
        engine.pin("a", False)
        assert await asyncio.wait_for(waiting, 10) == "b" and engine.loaded_sets() == ["b"]

        catalog.slot_wait_s = 0.3
        engine.pin("b", True)
        t = asyncio.get_running_loop().time()
        with pytest.raises(ServerBusyError, match="cannot be loaded right now"):
            await catalog._load_on_demand(str(sets["c"]))
        assert asyncio.get_running_loop().time() - t >= 0.3

    asyncio.run(run())


def test_concurrent_first_requests_for_a_composition_all_get_it(world, tiny_model_dir, tmp_path):
    """Two sets registered, not resident, loaded on demand: concurrent first requests for `a+b` (and
    the same composition spelled `a@1+b@1`, or `b+a` beside it) all resolve. The engine lists a set
    from the moment its load reserved slots (`loaded_sets`) but refuses its SetRef until the load is
    done (`ref`: "being loaded", a 404), so a request that found the composition "resident" while
    another request was still loading it must wait for that load, not answer 404."""
    from expertlib.registry import Registry
    from expertlib.server.sets import SetCatalog

    base, sets = world
    reg = Registry(tmp_path / "reg")
    for name in ("a", "b"):
        reg.publish(sets[name], base=tiny_model_dir("qwen2_moe"))

    async def run(models):
        engine = _async_engine(base, Workers(busy=100), max_sets=4)  # a load takes ~100 polls
        catalog = SetCatalog(engine, "tiny", reg, registry_base=str(tiny_model_dir("qwen2_moe")))
        first = asyncio.create_task(catalog.resolve(models[0]))
        while not engine._book.loading:  # the first request's load has reserved its slots
            assert not first.done()
            await asyncio.sleep(0.001)
        assert catalog.loaded()  # listed while it is being loaded: what the others find
        refs = await asyncio.gather(first, *(catalog.resolve(m) for m in models[1:]))
        return [r.name for r in refs], catalog

    names, _ = asyncio.run(run(["a+b", "a+b", "a+b"]))
    assert names == ["a@1+b@1"] * 3
    names, _ = asyncio.run(run(["a+b", "a@1+b@1", "b+a", "a+b"]))
    assert names == ["a@1+b@1", "a@1+b@1", "b@1+a@1", "a@1+b@1"]
    names, _ = asyncio.run(run(["a", "a@1", "a"]))  # one set, the same way
    assert names == ["a@1"] * 3


class _ServingWorkers(Workers):
    """Workers whose calls take a little while (seeded), whose background load job answers "not done
    yet" `busy` times per load, and which keep the rows written (row -> remap) so a request can be
    checked against them."""

    def __init__(self, rng, busy: int):
        super().__init__()
        self.rng, self.per_load = rng, busy
        self.rows: dict[int, dict] = {}

    async def __call__(self, method: str, args: tuple = ()) -> list:
        await asyncio.sleep(self.rng.random() * 0.002)
        if method == "expertlib_apply":
            for row in args[0]:
                self.rows.pop(row, None)
            if len(args) > 3:
                self.rows[args[3]] = args[4]
        if method == "expertlib_stage" and self.busy == 0 and self.calls[-1:] != [("expertlib_stage", args)]:
            self.busy = self.per_load  # a new load job
        return await super().__call__(method, args)


@pytest.mark.parametrize("max_sets", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_concurrent_first_requests_are_served_end_to_end(world, tiny_model_dir, tmp_path, seed, max_sets):
    """The request path as the server runs it (`catalog.resolve`, then `engine.generate` with the
    engine's `on_missing` reloading what was evicted meanwhile): requests for plain sets and for
    compositions, in several spellings, arrive while each other's loads are in flight (and, with
    two rows, evict each other). Every one is served by its set, on a row the workers have written;
    none is refused (404 "being loaded", or a set missing)."""
    import random

    from vllm import SamplingParams

    from expertlib.engine import AsyncExpertEngine
    from expertlib.registry import Registry
    from expertlib.server.sets import SetCatalog
    from expertlib.vllm_plugin import SET_ROW_KEY

    base, sets = world
    reg = Registry(tmp_path / "reg")
    for name in ("a", "b", "c"):
        reg.publish(sets[name], base=tiny_model_dir("qwen2_moe"))
    rng = random.Random(seed)
    models = ["a+b", "a+b", "a", "a@1+b@1", "b+c", "a+b", "c", "a", "b", "a+b", "a+c", "a+b"]
    want = {"a": "a@1", "b": "b@1", "c": "c@1", "a@1+b@1": "a@1+b@1"}
    workers = _ServingWorkers(rng, busy=25)

    class Core:  # vLLM's AsyncLLM: collective_rpc to the workers, generate checks the request's row
        async def collective_rpc(self, method, args=()):
            if method == "expertlib_info":
                info = dict(num_experts=base.num_experts, slots=8, max_sets=max_sets)
                return [dict(info, moe_layers=base.moe_layers, weight_absmax=[])]
            return await workers(method, args)

        async def generate(self, prompt, params, request_id):
            row = params.extra_args[SET_ROW_KEY]
            assert row in workers.rows, f"{request_id} runs on row {row}, which the workers have not written"
            for _ in range(3):
                await asyncio.sleep(rng.random() * 0.002)
                yield request_id

    async def run():
        engine = AsyncExpertEngine(Core(), base, 8, max_sets)
        catalog = SetCatalog(engine, "tiny", reg, registry_base=str(tiny_model_dir("qwen2_moe")))
        engine.on_missing = catalog.reload

        async def request(i: int, model: str) -> str:
            await asyncio.sleep(rng.random() * 0.2)  # arrivals spread over several loads
            for _ in range(200 if i % 2 else 0):  # every other one while a load is in flight
                if engine._book.loading:
                    break
                await asyncio.sleep(0.001)
            ref = await catalog.resolve(model)
            await asyncio.sleep(rng.random() * 0.01)  # tokenizing
            async for _ in engine.generate("x", SamplingParams(), f"r{i}-{model}", expert_set=ref):
                pass
            return ref.name

        return await asyncio.gather(*(request(i, m) for i, m in enumerate(models)), return_exceptions=True)

    served = asyncio.run(run())
    assert not [s for s in served if isinstance(s, BaseException)], served
    assert served == [want.get(m, m.replace("+", "@1+") + "@1") for m in models]


def test_compositions_and_auto_read_the_engine_only_on_the_event_loop(world, tiny_model_dir, tmp_path):
    """The engine's book changes on the event loop while loads run; the catalog's work on threads
    (opening a composition's parts, reading routing profiles) gets the resident sets as read on the
    loop, never iterates the book from its thread (a dict changing size under it would be a 500)."""
    import threading

    from expertlib.registry import Registry
    from expertlib.server.sets import SetCatalog

    base, sets = world
    reg = Registry(tmp_path / "reg")
    for name in ("a", "b"):
        reg.publish(sets[name], base=tiny_model_dir("qwen2_moe"))

    async def run():
        engine = _async_engine(base, Workers(), max_sets=4)
        loop_thread = threading.get_ident()
        for method in ("status", "loaded_sets"):
            read = getattr(engine, method)

            def on_loop(read=read, method=method):
                assert threading.get_ident() == loop_thread, f"engine.{method}() read from a thread"
                return read()

            setattr(engine, method, on_loop)
        catalog = SetCatalog(engine, "tiny", reg, registry_base=str(tiny_model_dir("qwen2_moe")))
        assert (await catalog.resolve("a")).name == "a@1"  # resident: the composition opens its file
        assert (await catalog.resolve("a+b")).name == "a@1+b@1"
        assert await catalog.resolve_auto([1, 2, 3], 0.5) == (None, {})  # no set has a profile

    asyncio.run(run())


def test_an_on_demand_load_looks_the_name_up_in_the_registry_once(world, tiny_model_dir, tmp_path):
    """A request naming a registered set that is not resident: the registry resolves the name once
    and the entry it returned is opened as it is (it was resolved four times, the reference turned
    into a string and parsed again on the way); the engine keeps the version it was opened at."""
    from expertlib.registry import Registry
    from expertlib.server.sets import SetCatalog

    base, sets = world
    reg = Registry(tmp_path / "reg")
    reg.publish(sets["a"], base=tiny_model_dir("qwen2_moe"))
    looked_up = []
    resolve = reg.resolve

    def counting(ref, **kw):
        looked_up.append(ref)
        return resolve(ref, **kw)

    reg.resolve = counting  # what the catalog and the registry's own open call

    async def run():
        engine = _async_engine(base, Workers(), max_sets=2)
        catalog = SetCatalog(engine, "tiny", reg, registry_base=str(tiny_model_dir("qwen2_moe")))
        ref = await catalog.resolve("a")
        return ref, engine.ref("a@1")

    ref, kept = asyncio.run(run())
    assert looked_up == ["a"]
    assert ref.name == "a@1" and ref.version == 1 and kept.version == 1


@pytest.mark.parametrize("always", [False, True])
def test_an_engine_that_hashes_every_load_never_reads_the_packed_cache(world, always):
    """`--verify-loads always`: the workers are told to leave the packed-set disk cache alone (slot
    bytes then always come from the file just hashed); its entries stay for other processes."""
    base, _ = world
    book = SetBook(base, 4, 2)
    book.verify_always = always
    calls = []

    async def rpc(method: str, args: tuple = ()) -> list:
        calls.append((method, args))
        if method == "expertlib_info":
            info = dict(num_experts=base.num_experts, slots=4, max_sets=2, moe_layers=base.moe_layers)
            return [dict(info, weight_absmax=[])]
        return [{"hits": 0, "paths": []}]

    _run_now(book.start(rpc))
    off = ("expertlib_packed_cache", (None, None, False, False))
    assert (off in calls) is always
