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
