"""Sizing a server before any engine starts (no vLLM here): KV cache from the model and the memory
there is, slots from the sets named at start, start-up refusals with the numbers, `model` forms."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from expertlib.errors import MemoryBudgetError, NotFoundError, SlotError
from expertlib.sizing import (
    CPU_RESERVE,
    DEFAULT_SLOTS,
    KV_SHARE,
    GiB,
    MiB,
    ServingSizes,
    fit_max_model_len,
    parse_size,
    plan_kv_cache,
    plan_slots,
)

#: A Qwen2-MoE-like base (bf16): 24 layers, 16 KV heads of 128, 60 experts of 1408 x 2048.
REAL = ServingSizes(
    kv_bytes_per_token=2 * 24 * 16 * 128 * 2,
    expert_bytes=3 * 2048 * 1408 * 2,
    moe_layers=24,
    num_experts=60,
    weights_bytes=28 * GiB,
    max_position=8192,
)


def five_per_layer(first: int, layers=range(24)) -> dict[int, list[int]]:
    return {layer: list(range(first, first + 5)) for layer in layers}


def test_parse_size():
    assert parse_size("4GiB") == 4 * GiB and parse_size("512MiB") == 512 * MiB
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2g") == 2 * 10**9 and parse_size("77") == 77
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_dims_of_a_tiny_base(tiny_model_dir):
    from expertlib.checkpoint import BaseCheckpoint

    base = BaseCheckpoint(tiny_model_dir("qwen2_moe"))
    cfg = base.config
    dims = ServingSizes.of(base, dtype="float32")
    head = cfg.hidden_size // cfg.num_attention_heads
    assert dims.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * 4
    expert = base.expert(base.moe_layers[0], 0)  # the tensors on disk say how big an expert is
    assert dims.expert_bytes == sum(t.numel() for _, t in expert.items()) * 4
    assert dims.moe_layers == len(base.moe_layers) and dims.num_experts == base.num_experts
    assert (
        dims.weights_bytes > 0
        and ServingSizes.of(base, dtype="bfloat16").expert_bytes == dims.expert_bytes // 2
    )


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v2"])
def test_serving_sizes_are_the_model_shape_in_bytes(tiny_model_dir, arch):
    """One description of a base's dimensions (ModelShape) for training's plan and serving's sizes:
    an expert's bytes are its tensors on disk, biases included (gpt_oss), and MLA's KV is its latent."""
    from expertlib.checkpoint import BaseCheckpoint
    from expertlib.shape import ModelShape

    base = BaseCheckpoint(tiny_model_dir(arch))
    dims, shape = ServingSizes.of(base, dtype="float32"), ModelShape.from_config(base.config)
    expert = base.expert(base.moe_layers[0], 0)
    assert dims.expert_bytes == sum(t.numel() for _, t in expert.items()) * 4 == shape.params_per_expert * 4
    assert dims.kv_bytes_per_token == shape.kv_per_token * 4 and dims.moe_layers == len(shape.moe_layers)


def test_cpu_kv_cache_fits_the_free_memory_not_a_fraction_of_the_node():
    free = 40 * GiB
    plan = plan_kv_cache(REAL, max_model_len=8192, max_num_seqs=128, slot_bytes=2 * GiB, available=free)
    room = free - REAL.weights_bytes - 2 * GiB - CPU_RESERVE
    assert plan.kv_bytes <= room * KV_SHARE < 0.92 * free  # never vLLM's 0.92 of the node
    one_seq = 8192 * REAL.kv_bytes_per_token
    assert plan.kv_bytes >= one_seq and plan.sequences >= 1
    small = plan_kv_cache(REAL, max_model_len=512, max_num_seqs=4, slot_bytes=0, available=free)
    assert small.kv_bytes == 4 * 512 * REAL.kv_bytes_per_token  # all it needs, not more
    assert "sized from the model" in small.describe()


def test_memory_refusals_are_one_line_with_numbers_and_the_flag():
    with pytest.raises(MemoryBudgetError) as e:
        plan_kv_cache(REAL, max_model_len=8192, max_num_seqs=8, slot_bytes=GiB, available=30 * GiB)
    msg = str(e.value)
    assert "GiB" in e.value.message and "\n" not in e.value.message and "--max-model-len" in msg
    assert "28.00 GiB" in msg  # the weights figure is in the message
    with pytest.raises(MemoryBudgetError, match="--kv-cache-memory"):
        plan_kv_cache(
            REAL, max_model_len=8192, max_num_seqs=8, slot_bytes=0, available=40 * GiB, kv_cache_memory=MiB
        )
    given = plan_kv_cache(
        REAL, max_model_len=8192, max_num_seqs=8, slot_bytes=0, available=40 * GiB, kv_cache_memory=2 * GiB
    )
    assert given.kv_bytes == 2 * GiB and given.given


def test_a_too_long_default_context_is_shortened_to_what_fits():
    free = 31 * GiB
    fit = fit_max_model_len(REAL, 32768, slot_bytes=0, available=free)
    assert 0 < fit < 32768
    plan_kv_cache(REAL, max_model_len=fit, max_num_seqs=1, slot_bytes=0, available=free)  # fits
    with pytest.raises(MemoryBudgetError):
        plan_kv_cache(REAL, max_model_len=fit * 3, max_num_seqs=1, slot_bytes=0, available=free)


def test_slots_auto_holds_every_named_set_plus_headroom():
    named = {"a@1": five_per_layer(0), "b@1": five_per_layer(5), "c@1": five_per_layer(10)}
    plan = plan_slots(REAL, named)
    assert plan.need == 15 > DEFAULT_SLOTS  # more than the old default of 8 slots
    assert plan.slots == 15 + 5 and plan.extra == 1 and plan.max_sets >= 3
    assert plan.slot_bytes == plan.slots * REAL.expert_bytes * 24
    assert "20 per MoE layer" in plan.describe() and "room for 1 more" in plan.describe()
    with pytest.raises(SlotError) as e:  # an explicit count that cannot hold them: refused, not evicted
        plan_slots(REAL, named, slots=8)
    assert "need 15 slots" in e.value.message and "--slots 15" in e.value.hint
    with pytest.raises(SlotError, match="--max-sets"):
        plan_slots(REAL, named, max_sets=2)


def test_slots_from_an_expert_memory_budget():
    row = REAL.expert_bytes * 24
    plan = plan_slots(REAL, {}, [five_per_layer(0)], expert_memory=4 * GiB)
    assert plan.slots == 4 * GiB // row and plan.source == "memory" and plan.extra == plan.slots // 5
    with pytest.raises(SlotError, match="--expert-memory"):
        plan_slots(REAL, {"a@1": five_per_layer(0)}, expert_memory=row * 3)
    assert plan_slots(REAL, {}).slots == DEFAULT_SLOTS  # nothing known: the old default


# --- the server's start-up, with a stand-in engine -----------------------------------------------------


class _Engine:
    """Counts slots like the real engine (SlotPool), without vLLM."""

    def __init__(self, settings, base):
        from expertlib.slots import SlotPool

        self.settings = settings
        self.pool = SlotPool(base.moe_layers, base.num_experts, settings.slots, settings.max_sets)
        self.digests: dict[str, str] = {}

    async def load(self, es, name=None, pin=False):
        m = es.manifest
        self.pool.place(name, m.experts, m.expert_digests, pinned=pin)
        self.digests[name] = m.content_digest
        return name

    def ref(self, name):
        from expertlib.slots import SetRef

        return SetRef(name, self.digests[name], self.pool.row_of(name))

    def pin(self, name, pinned=True):
        self.pool.pin(name, pinned)

    def loaded_sets(self):
        return self.pool.loaded()

    def status(self):
        return self.pool.status()

    def get_tokenizer(self):
        return None

    def shutdown(self):
        pass


@pytest.fixture
def three_sets(tmp_path, tiny_model_dir):
    """A registry with three sets of 5 experts in every MoE layer of a tiny base (8 experts)."""
    from expertlib.checkpoint import BaseCheckpoint
    from expertlib.moe import load_model
    from expertlib.registry import Registry
    from expertlib.vllm_plugin.testing import random_expert_set

    base_dir = tiny_model_dir("qwen2_moe")
    base = BaseCheckpoint(base_dir)
    model = load_model(base_dir)
    reg = Registry(tmp_path / "reg")
    for i, task in enumerate(("law", "math", "code")):
        experts = {layer: [(i + k) % 8 for k in range(5)] for layer in base.moe_layers}
        path = random_expert_set(model, task, experts, seed=i).save(tmp_path / f"{task}.safetensors")
        reg.publish(path, base=base_dir)
    return base_dir, base, reg


def _start(settings, base):
    from expertlib.server import ServerState

    async def run():
        state = ServerState(settings, engine_factory=lambda s: _Engine(s, base))
        await state.start()
        return state

    return asyncio.run(run())


def test_all_with_more_sets_than_the_old_default_fits_all_of_them(three_sets):
    from expertlib.server import ServerSettings

    base_dir, base, reg = three_sets
    state = _start(ServerSettings(base=str(base_dir), registry=str(reg.root), all_sets=True), base)
    assert state.ready, state.startup_error
    assert sorted(state.engine.loaded_sets()) == ["code@1", "law@1", "math@1"]  # none evicted at start
    assert state.engine.settings.slots == 15 + 5 > DEFAULT_SLOTS
    assert not any(r.pinned for r in state.engine.pool._sets.values())  # start-up pins are released


def test_all_with_too_few_slots_refuses_to_start_with_the_numbers(three_sets):
    from expertlib.server import ServerSettings

    base_dir, base, reg = three_sets
    settings = ServerSettings(base=str(base_dir), registry=str(reg.root), all_sets=True, slots=8)
    state = _start(settings, base)
    assert not state.ready and state.engine is None  # refused before the engine was built
    assert isinstance(state.startup_error, SlotError) and "need 15 slots" in str(state.startup_error)


def test_model_forms_task_version_tag_and_base_prefix(three_sets):
    from expertlib.server.sets import SetCatalog

    base_dir, base, reg = three_sets
    reg.tag("math@1", "stable")

    async def run():
        engine = _Engine(type("S", (), {"slots": 20, "max_sets": 8})(), base)
        catalog = SetCatalog(engine, "./base", reg, registry_base=str(base_dir))
        got = [
            await catalog.resolve(m) for m in ("math", "math@1", "math@stable", "base:math", "./base:law@1")
        ]
        # loaded on demand, once each; one SetRef value per set (served name, registry version, set row)
        assert [r.name for r in got] == ["math@1", "math@1", "math@1", "math@1", "law@1"]
        assert got[0] == got[3] and got[0].version == 1 and got[4].set_row != got[0].set_row
        assert got[0].digest == reg.resolve("math@1").content_digest
        assert await catalog.resolve("base") is None and await catalog.resolve("./base") is None
        with pytest.raises(NotFoundError, match="names the base 'other'"):
            await catalog.resolve("other:math")
        digest = reg.resolve("code@1").digest
        code = await catalog.resolve(f"code@{digest[:15]}")  # a digest's colon is no base prefix
        assert code.name == "code@1"

    asyncio.run(run())


def test_cli_slots_and_sizes_reach_the_settings(serve_settings):
    from expertlib.cli.main import cli

    argv = ["./base", "--expert-memory", "4GiB", "--kv-cache-memory", "512MiB", "--no-load-on-demand"]
    s = serve_settings(
        *argv, "--host-cache-memory", "0", "--max-model-len", "1024", "--packed-cache-disk", "2GiB"
    )
    assert s.slots == "auto" and s.expert_memory == 4 * GiB and s.kv_cache_memory == 512 * MiB
    assert s.packed_cache_disk == 2 * GiB
    assert s.load_on_demand is False and s.host_cache_memory == 0 and s.max_model_len == 1024
    res = CliRunner().invoke(cli, ["serve", "./base", "--slots", "many"])
    assert res.exit_code == 2 and "neither 'auto' nor a number" in res.output
    res = CliRunner().invoke(cli, ["serve", "--help"])
    assert "scrape_configs" in res.output and "--no-load-on-demand" in res.output


def test_gpu_keeps_utilization_and_accounts_for_the_slots():
    from expertlib.sizing import check_gpu_fit

    check_gpu_fit(REAL, slot_bytes=4 * GiB, total=80 * GiB, utilization=0.9, free=79 * GiB)  # fits
    with pytest.raises(MemoryBudgetError, match="expert slots 50.00 GiB"):
        check_gpu_fit(REAL, slot_bytes=50 * GiB, total=80 * GiB, utilization=0.9)
    with pytest.raises(MemoryBudgetError, match="gpu_memory_utilization=0"):
        check_gpu_fit(REAL, slot_bytes=GiB, total=80 * GiB, utilization=0.9, free=40 * GiB)


def test_requests_for_a_set_being_loaded_wait_for_that_one_load(three_sets):
    from expertlib.server.sets import SetCatalog

    base_dir, base, reg = three_sets

    class Slow(_Engine):
        calls = 0

        async def load(self, es, name=None, pin=False):
            Slow.calls += 1
            await asyncio.sleep(0.2)  # while this runs, the other requests arrive
            return await super().load(es, name, pin)

    async def run():
        engine = Slow(type("S", (), {"slots": 20, "max_sets": 8})(), base)
        catalog = SetCatalog(engine, "./base", reg, registry_base=str(base_dir))
        got = await asyncio.gather(*(catalog.resolve(m) for m in ("math", "math@1", "math", "base:math")))
        assert [r.name for r in got] == ["math@1"] * 4 and Slow.calls == 1
        off = SetCatalog(engine, "./base", reg, registry_base=str(base_dir), load_on_demand=False)
        with pytest.raises(Exception, match="registered but not loaded"):
            await off.resolve("code")

    asyncio.run(run())


def test_cache_sizes_reach_the_engine(serve_settings, monkeypatch):
    """What `serve` was told of its caches is what the engine starts with."""
    from expertlib.engine import AsyncExpertEngine
    from expertlib.server.state import default_engine_factory

    got = {}
    monkeypatch.setattr(AsyncExpertEngine, "from_base", classmethod(lambda cls, base, **kw: got.update(kw)))
    default_engine_factory(
        serve_settings("./base", "--host-cache-memory", "1GiB", "--packed-cache-disk", "0")
    )
    assert got["host_cache"] == GiB and got["packed_cache"] == 0
    got.clear()
    default_engine_factory(serve_settings("./base"))
    assert "packed_cache" not in got and "host_cache" not in got  # the defaults: the engine's own
