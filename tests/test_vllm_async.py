"""The composer on vLLM's async engine: sets load and unload while other requests stream, no request
fails, and every request gets exactly the output its set gives alone."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.errors import NotLoadedError  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=8)


def params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, loop):
    from served_world import build

    from expertlib.engine import AsyncExpertEngine

    root = tmp_path_factory.mktemp("vllm-async")
    maps = {"a": {0: [1, 3], 1: [0]}, "b": {0: [2], 1: [5, 6]}, "c": {0: [4], 1: [1]}, "d": {0: [0, 5]}}
    base_dir, _ = build(root, maps, scale=None, publish=())  # files only, random_expert_set's scale
    paths = {n: root / f"{n}.safetensors" for n in maps}

    async def start():  # AsyncLLM binds its output handler to the running loop
        return AsyncExpertEngine.from_base(base_dir, slots=4, max_sets=4, **ENGINE_KW)

    engine = loop.run_until_complete(start())
    yield dict(engine=engine, paths=paths, base_dir=base_dir)
    engine.shutdown()


_ids = iter(range(10**6))


async def run(
    engine, prompt: str, expert_set: str | None, max_tokens: int, first_token: asyncio.Event | None = None
):
    final = None
    async for out in engine.generate(prompt, params(max_tokens), f"req-{next(_ids)}", expert_set=expert_set):
        if first_token is not None and out.outputs[0].token_ids:
            first_token.set()
        final = out
    assert final is not None and final.finished
    return list(final.outputs[0].token_ids)


def test_hot_load_and_unload_while_serving(world, loop):
    engine, paths = world["engine"], world["paths"]
    long = 96

    async def scenario():
        for n in ("a", "b", "c"):
            await engine.load(paths[n])
        alone = {s: await run(engine, "Hello world", s, long) for s in ("a", "b", "c", None)}
        assert len({tuple(v) for v in alone.values()}) == 4, "each set gives its own output"
        await engine.unload("c")
        assert sorted(engine.loaded_sets()) == ["a", "b"]

        # requests for a, b and the base stream; meanwhile c is hot-loaded and b unloaded
        started = asyncio.Event()
        tasks = {
            s: asyncio.create_task(run(engine, "Hello world", s, long, started)) for s in ("a", "b", None)
        }
        await started.wait()
        assert await engine.load(paths["c"]) == "c"
        assert not any(t.done() for t in tasks.values()), "the load happened while requests were generating"
        task_c = asyncio.create_task(run(engine, "Hello world", "c", long))
        unload_b = asyncio.create_task(engine.unload("b"))
        await asyncio.sleep(0)
        with pytest.raises(NotLoadedError):  # b is going away: new requests for it are refused
            await run(engine, "Hello world", "b", 4)
        assert not unload_b.done() or tasks["b"].done()  # unload waits for b's request in flight
        results = {s: await t for s, t in tasks.items()}
        results["c"] = await task_c
        await unload_b
        assert "b" not in engine.loaded_sets()
        for s, toks in results.items():
            assert toks == alone[s], f"set {s} changed output under hot load/unload"

        # eviction under load: a is in flight, so it is never the one evicted
        assert engine.status()["sets"]["a"]["in_flight"] == 0
        started = asyncio.Event()
        task_a = asyncio.create_task(run(engine, "Hello world", "a", long, started))
        await started.wait()
        assert engine.status()["sets"]["a"]["in_flight"] == 1
        await run(engine, "Hi", "c", 2)  # c is now the most recently used set, a the least
        await engine.load(paths["d"])  # needs 2 slots in layer 0 where 1 is free: evicts c, not a
        assert sorted(engine.loaded_sets()) == ["a", "d"]
        assert await task_a == alone["a"]
        assert engine.status()["sets"]["a"]["in_flight"] == 0
        assert await run(engine, "Hello world", "d", long) != alone[None]

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=600))


def test_async_api_surface(world, loop):
    engine = world["engine"]

    async def scenario():
        tok = engine.get_tokenizer()
        assert tok is not None
        rid = "to-abort"
        gen = engine.generate("Hello", params(200), rid, expert_set=None)
        first = await gen.__anext__()
        await engine.abort(rid)
        async for _ in gen:
            pass
        assert first is not None
        with pytest.raises(NotLoadedError):
            await run(engine, "Hello", "nope", 2)
        st = engine.status()
        assert set(st) >= {"sets", "slots_used", "slots_per_layer", "max_sets", "base"}

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


# --- packing sets ahead of their first request (expertlib.vllm_plugin.prepack, server/prepack.py) -----
# The async engine's workers run in vLLM's engine process: their caches are driven and read by RPC.


class Workers:
    """The workers' packed-set disk cache and host cache, through the engine's RPC."""

    def __init__(self, engine):
        self.engine = engine

    async def packed(self, budget=None, root=None, enabled=None) -> dict:
        return (await self.engine._rpc("expertlib_packed_cache", (budget, root, True, enabled)))[0]

    async def host(self) -> dict:
        return (await self.engine._rpc("expertlib_host_cache", ()))[0]


@pytest.fixture
def workers(world, loop, tmp_path):
    """The workers' packed-set disk cache in a fresh folder, 1 GiB; off again afterwards."""
    w = Workers(world["engine"])
    loop.run_until_complete(w.packed(1 << 30, str(tmp_path / "packed"), True))
    yield w
    loop.run_until_complete(w.packed(0, None, True))


def fresh_set(world, name: str, experts: dict[int, list[int]], seed: int):
    """A set no test of this module loaded before, saved beside the others."""
    from expertlib.moe import load_model
    from expertlib.vllm_plugin.testing import random_expert_set

    if "model" not in world:
        world["model"] = load_model(world["base_dir"])
    es = random_expert_set(world["model"], name, experts, seed=seed)
    return es.save(world["paths"]["a"].parent / f"{name}.safetensors")


def test_a_set_packed_ahead_loads_from_the_packed_cache_with_its_own_answer(world, loop, workers):
    """`prepack` writes the set to the packed-set cache only (no slot, no host-cache entry); its first
    load is then a packed-cache hit that packs nothing, and answers as the set packed from its file."""
    engine = world["engine"]
    path = fresh_set(world, "ahead", {0: [3, 6], 1: [2]}, seed=21)

    async def scenario():
        host = await workers.host()
        result = await engine.prepack(path)
        assert result["outcome"] == "packed" and result["bytes"] > 0
        assert (await workers.packed())["entries"] == 1
        assert "ahead" not in engine.loaded_sets() and (await workers.host())["paths"] == host["paths"]
        assert (await engine.prepack(path))["outcome"] == "cached"

        before, host = await workers.packed(), await workers.host()
        await engine.load(path)
        after = await workers.packed()
        assert after["hits"] == before["hits"] + 1 and (await workers.host())["misses"] == host["misses"]
        from_cache = await run(engine, "Hello world", "ahead", 24)
        await engine.unload("ahead")
        await workers.packed(enabled=False)  # now read, checked and packed from the set's file
        await engine.load(path)
        assert (await workers.host())["misses"] == host["misses"] + 1
        assert await run(engine, "Hello world", "ahead", 24) == from_cache
        assert from_cache != await run(engine, "Hello world", None, 24)
        await engine.unload("ahead")

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


def test_packing_ahead_pauses_while_a_request_runs_and_resumes(world, loop, workers, monkeypatch):
    """A request that arrives while a set is packed ahead is served (its own answer) while the workers
    are granted no piece of the packing (the one in progress when it arrived finishes); the packing
    then resumes and ends."""
    engine = world["engine"]
    path = fresh_set(world, "paused", {0: [0, 7], 1: [4, 6]}, seed=22)
    grants: list[int] = []  # requests streaming at each piece granted
    rpc = engine._rpc

    async def watched(method, args=()):
        if method == "expertlib_prepack" and len(args) == 3:
            grants.append(engine._requests)
        return await rpc(method, args)

    monkeypatch.setattr(engine, "_rpc", watched)

    async def scenario():
        alone = await run(engine, "Hello world", None, 160)
        started = asyncio.Event()
        request = asyncio.create_task(run(engine, "Hello world", None, 160, started))
        await started.wait()
        packing = asyncio.create_task(engine.prepack(path))
        assert await request == alone
        assert not packing.done(), "packing waits for the request"
        assert (await packing)["outcome"] == "packed"
        assert len(grants) >= 3 and not any(grants)

        # a request arriving mid-packing: no piece granted until it is done
        grants.clear()
        second = fresh_set(world, "paused2", {0: [1, 2], 1: [3]}, seed=23)
        packing = asyncio.create_task(engine.prepack(second))
        while not grants:
            await asyncio.sleep(0.001)
        assert await run(engine, "Hello world", None, 160) == alone
        assert (await packing)["outcome"] == "packed"
        assert not any(grants)

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


def test_the_registry_s_sets_are_packed_ahead_a_damaged_one_skipped(world, loop, workers, tmp_path):
    """The server's `Prepacker` over the registry: every set of the base packed ahead except one whose
    blob was damaged after publishing (skipped, logged, nothing written); a set published while it
    runs is packed without a request, and its first request is a packed-cache hit."""
    from expertlib.registry import Registry
    from expertlib.server.prepack import Prepacker
    from expertlib.server.sets import SetCatalog

    engine = world["engine"]
    reg = Registry(tmp_path / "reg")
    good = fresh_set(world, "good", {0: [5], 1: [0, 7]}, seed=24)
    bad = fresh_set(world, "bad", {0: [6], 1: [5]}, seed=25)
    reg.publish(good, base=world["base_dir"])
    reg.publish(bad, base=world["base_dir"])
    blob = reg.get_path(reg.resolve("bad", base=world["base_dir"]))
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    catalog = SetCatalog(engine, "tiny", reg, registry_base=world["base_dir"])
    prepacker = Prepacker(engine, catalog, relist_s=0.1)

    async def scenario():
        await prepacker.round()
        assert prepacker.status()["packed"] == 1 and prepacker.status()["failed"] == 1
        assert (await workers.packed())["entries"] == 1
        prepacker.start()
        later = fresh_set(world, "later", {0: [2, 4], 1: [1]}, seed=26)
        await asyncio.to_thread(reg.publish, later, base=world["base_dir"])
        for _ in range(300):
            if prepacker.status()["packed"] == 2:
                break
            await asyncio.sleep(0.05)
        prepacker.stop()
        st = prepacker.status()
        assert st["packed"] == 2 and st["failed"] == 1 and st["pending"] == 0
        before = await workers.packed()
        assert before["entries"] == 2
        ref = await catalog.resolve("later")
        assert ref is not None and (await workers.packed())["hits"] == before["hits"] + 1
        await engine.unload(ref.name)

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


def test_packing_ahead_fills_only_the_free_space(world, loop, workers):
    """A set that does not fit the cache's free space is not packed ahead, and no entry is removed to
    make room for it."""
    engine = world["engine"]
    one = fresh_set(world, "room1", {0: [1], 1: [2]}, seed=27)
    two = fresh_set(world, "room2", {0: [3], 1: [4]}, seed=28)

    async def scenario():
        first = await engine.prepack(one)
        assert first["outcome"] == "packed"
        await workers.packed(first["bytes"] + first["bytes"] // 2)  # room for 1.5 such sets
        assert (await engine.prepack(two))["outcome"] == "no room"
        st = await workers.packed()
        assert st["entries"] == 1 and st["bytes"] == first["bytes"]

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


def cpu_list(text: str) -> set[int]:
    """A kernel CPU list ("0-3,6") as a set."""
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_a_load_job_runs_on_every_cpu(world, loop):
    """The worker's load job (a thread started from the worker, which vLLM binds to the forward
    steps' cores, and which OpenMP binds again at its first parallel region) may run on every CPU
    while it packs the set: it does not take turns with the forward steps on their cores."""
    engine = world["engine"]
    path = fresh_set(world, "anycpu", {0: [6, 7], 1: [3]}, seed=29)

    async def scenario():
        await engine.load(path)
        cpus = (await engine._rpc("expertlib_host_cache", ()))[0]["last_job_cpus"]
        await engine.unload("anycpu")
        assert cpu_list(cpus) == set(range(os.cpu_count() or 1)), cpus

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))


def test_a_routing_prefill_counts_as_a_request(world, loop, monkeypatch):
    """model="auto"'s routing prefill is a request like any other while it runs: packing ahead and a
    load's polls (which wait only while no request runs) see the engine busy."""
    engine = world["engine"]
    idle_then: list[bool] = []
    generate = engine.engine.generate

    def watched(*args, **kwargs):
        idle_then.append(engine.idle())
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.engine, "generate", watched)

    async def scenario():
        counts = await engine.routing_of(engine.get_tokenizer().encode("Hello world"))
        assert counts and idle_then == [False] and engine.idle()

    loop.run_until_complete(asyncio.wait_for(scenario(), timeout=300))
