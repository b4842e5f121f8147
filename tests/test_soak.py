"""Soak, reduced: load / unload / evict cycles on the async engine while requests run. Every answer
equals its set's reference (the set alone, greedy), and nothing accumulates: slots, set rows, staged
bytes, host cache and requests in flight are back to their bounds after every cycle. The full form
(1000 cycles of real-shape sets, resident memory) is `python bench/engine_load.py --soak 1000`."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.moe import load_model  # noqa: E402
from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CYCLES = 30
ENGINE_KW = dict(enforce_eager=True, dtype="float32", max_model_len=128, max_num_seqs=8)
PROMPT, TOKENS = "The cat sat on", 6


def test_soak_reduced(tmp_path, monkeypatch):
    """With no host cache, every load after a set's first comes from the packed-set disk cache (the
    worker's, in the engine core's process), which stays within its bound."""
    from vllm import SamplingParams

    from expertlib.engine import AsyncExpertEngine
    from expertlib.vllm_plugin.hostcache import HOST_CACHE

    base_dir = tmp_path / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    model = load_model(base_dir)
    # two experts per MoE layer each, four slots per layer: two sets fit, a third evicts one
    maps = {n: {0: [i, (i + 3) % 8], 1: [(i + 1) % 8, (i + 5) % 8]} for i, n in enumerate("abcd")}
    paths = {
        n: random_expert_set(model, n, m, seed=i + 1).save(tmp_path / f"{n}.safetensors")
        for i, (n, m) in enumerate(maps.items())
    }
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    ids = iter(range(10**6))

    async def answer(engine, name: str | None) -> list[int]:
        final = None
        async for out in engine.generate(PROMPT, params, f"soak-{next(ids)}", expert_set=name):
            final = out
        return list(final.outputs[0].token_ids)

    async def packed(engine, budget=None, root=None) -> dict:
        """The worker's packed-set cache after its pending writes (bounded or moved first)."""
        return (await engine._rpc("expertlib_packed_cache", (budget, root, True)))[0]

    def check_flat(engine) -> None:
        st, book = engine.status(), engine._book
        assert len(engine.loaded_sets()) <= 2 and not book.loading and not book.in_flight
        # slots in use are exactly the resident sets' experts (dedup aside): none leaks
        assert st["slots_used_total"] == sum(s["experts"] for s in st["sets"].values())
        assert sorted(s["set_row"] for s in st["sets"].values()) in ([], [1], [2], [1, 2])
        assert not HOST_CACHE._staged and not HOST_CACHE._reading  # nothing left from a load
        assert HOST_CACHE.nbytes <= HOST_CACHE.budget
        assert st["host_cache"]["bytes"] <= st["host_cache"]["budget"]  # the workers' own, as last reported

    async def soak() -> None:
        engine = AsyncExpertEngine.from_base(
            base_dir, slots=4, max_sets=2, host_cache=0, packed_cache=1 << 30, **ENGINE_KW
        )
        try:
            await packed(engine, None, str(tmp_path / "packed"))  # this test's folder; bound at start
            reference = {}
            for n, p in paths.items():  # each set alone (packed from its file), then out again
                await engine.load(p)
                reference[n] = await answer(engine, n)
                await engine.unload(n)
            st = await packed(engine)
            assert st["entries"] == len(paths) and st["budget"] == 1 << 30  # serve --packed-cache-disk
            budget = int(4.5 * st["bytes"] / len(paths))  # room for the four sets' entries
            hits = (await packed(engine, budget))["hits"]
            base = await answer(engine, None)
            assert all(r != base for r in reference.values())  # the sets do change the answers
            names = list(paths)
            for i in range(CYCLES):
                new, other = names[i % 4], names[(i + 2) % 4]
                if other not in engine.loaded_sets():
                    await engine.load(paths[other])
                # load `new` (evicting the least recently used set) while `other` and the base answer
                running = [
                    asyncio.create_task(answer(engine, other)),
                    asyncio.create_task(answer(engine, None)),
                ]
                await engine.load(paths[new])
                got_other, got_base = await asyncio.gather(*running)
                assert got_other == reference[other] and got_base == base
                assert await answer(engine, new) == reference[new]
                if i % 5 == 4:
                    await engine.unload(new)
                check_flat(engine)
                st = await packed(engine)
                assert st["bytes"] <= budget and st["entries"] == len(paths)
            assert st["hits"] > hits + CYCLES // 2 and st["refused"] == 0  # loads read it, none refused
        finally:
            engine.shutdown()

    asyncio.run(soak())
