"""Attack cases of numerically hostile expert sets, and of a server killed with SIGKILL.

The case: a set whose expert weights are finite but huge (1e30, honest digests) passed every check;
once it ran in a shared batch on CPU vLLM, the base and every other set answered blank, and stayed
blank after the set was unloaded. How: the set's tokens overflow to inf/NaN in its experts, the NaN
reaches their keys and values in the KV cache, and those blocks outlive the request: vLLM hands freed
blocks to the next requests without clearing them, and the CPU attention kernel reads whole tiles of a
block under a masked softmax (0 x NaN = NaN), so whoever gets the block next answers blank
(`test_without_containment_nan_outlives_the_request` shows it). Same-step batch ops do not leak.

Two defences, each tested here: such sets are refused at load (`expertlib.bounds`), and a set that
produces NaN anyway (the bound turned off) cannot reach other requests (`SlotContext.contain`).
"""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from expertlib.bounds import (
    DEFAULT_FACTOR,
    WeightBounds,
    check_bounds,
    model_absmax,
    set_absmax,
    tensor_absmax,
)
from expertlib.errors import WeightBoundError
from expertlib.moe import load_model, read_expert
from expertlib.patch import ExpertSet

HUGE = 1e30


def huge_set(model, experts: list[tuple[int, int]], task: str = "huge", value: float = HUGE) -> ExpertSet:
    """A set replacing `experts` by constant `value` weights, every digest honest."""
    from expertlib.identity import base_identity

    weights = {k: read_expert(model, *k).map(lambda t: torch.full_like(t, value)) for k in experts}
    return ExpertSet.build(
        task=task,
        base=base_identity(model),
        experts=weights,
        base_digests={k: read_expert(model, *k).digest() for k in experts},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base

    base_dir = tmp_path_factory.mktemp("attack-sets") / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    return base_dir


# --- the bound ------------------------------------------------------------------------------------


def test_huge_weights_refused_naming_tensor_bound_and_override(tiny):
    model = load_model(tiny)
    bounds = WeightBounds(model_absmax(model))
    es = huge_set(model, [(0, 1), (1, 2)])
    with pytest.raises(WeightBoundError) as err:
        check_bounds(set_absmax(es), bounds, name="huge")
    msg = str(err.value)
    assert "expert set 'huge'" in msg and ("layers.0.experts.1." in msg or "layers.1.experts.2." in msg)
    assert "1e+30" in msg and f"{DEFAULT_FACTOR:g} x the base experts' max |w|" in msg
    assert "--weight-bound" in msg and "inf turns the check off" in msg
    assert "5 more tensors" in msg  # gate, up, down of both experts: 6 out of bounds
    check_bounds(set_absmax(es), WeightBounds(model_absmax(model), math.inf))  # the admin's override
    with pytest.raises(WeightBoundError):  # NaN never passes as "within bounds"
        check_bounds({"layers.0.experts.1.gate": math.nan}, bounds)


def test_bound_statistics_are_the_base_experts_maxima(tiny):
    model = load_model(tiny)
    stats = model_absmax(model)
    for layer in (0, 1):
        ws = [read_expert(model, layer, e) for e in range(8)]
        assert stats[(layer, "gate_up")] == max(float(t.abs().max()) for w in ws for t in (w.gate, w.up))
        assert stats[(layer, "down")] == max(float(w.down.abs().max()) for w in ws)
    es = huge_set(model, [(0, 3)], value=0.5)
    assert tensor_absmax(es.tensors) == {n: 0.5 for n in es.tensors}
    bounds = WeightBounds(stats, factor=2.0)
    assert bounds.limit(0, "up") == 2.0 * stats[(0, "gate_up")] and bounds.limit(5, "down") is None
    with pytest.raises(ValueError, match="> 0"):
        WeightBounds(stats, factor=0)


def test_legit_sets_pass_the_default_bound(tiny):
    """The tests' largest synthetic perturbation (std 2.0, ~110x the tiny base's maxima) and the
    benchmarks' fine-tuning-sized sets pass; the demo's trained sets measure 0.92-1.10x."""
    from expertlib.vllm_plugin.testing import make_bench_sets, random_expert_set

    model = load_model(tiny)
    bounds = WeightBounds(model_absmax(model))
    everything = {0: list(range(8)), 1: list(range(8))}
    for scale in (0.5, 2.0):
        check_bounds(set_absmax(random_expert_set(model, "s", everything, seed=5, scale=scale)), bounds)
    for es in make_bench_sets(model, 3):
        check_bounds(set_absmax(es), bounds)


def test_composer_refuses_huge_set_and_keeps_what_is_loaded(tiny):
    from expertlib.compose import compose
    from expertlib.vllm_plugin.testing import random_expert_set

    model = load_model(tiny)
    alpha = random_expert_set(model, "alpha", {0: [1, 3]}, seed=1)
    composed = compose(model, [alpha], slots=4, max_sets=2)
    ids = torch.tensor([[5, 9, 13, 17]])
    before = composed(ids, expert_sets="alpha").logits
    with pytest.raises(WeightBoundError, match="above its bound"):
        composed.load(huge_set(model, [(0, 2), (1, 4)]))
    assert composed.loaded() == ["alpha"]
    assert torch.equal(composed(ids, expert_sets="alpha").logits, before)
    override = compose(load_model(tiny), [], slots=4, max_sets=2, weight_bound=math.inf)
    assert override.load(huge_set(model, [(0, 2)])) == "huge"


def test_weight_bound_setting_and_flag(serve_settings):
    from click.testing import CliRunner

    from expertlib.cli.main import cli
    from expertlib.server import ServerSettings

    assert ServerSettings(base="b").weight_bound == DEFAULT_FACTOR
    assert serve_settings("./base", "--weight-bound", "inf").weight_bound == math.inf
    res = CliRunner().invoke(cli, ["serve", "./base", "--weight-bound", "0"])
    assert res.exit_code == 2 and "--weight-bound" in res.output


# --- containment in the engine (the bound turned off by the admin) ---------------------------------

PROMPTS = ["Hello world", "2+2=", "The cat sat on the mat and", "def f(x):", "Q: why is the sky blue?"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def world(tiny):
    pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from expertlib.engine import ExpertEngine
    from expertlib.vllm_plugin.testing import random_expert_set

    model = load_model(tiny)
    alpha = random_expert_set(model, "alpha", {0: [1, 3], 1: [0, 5]}, seed=1)
    every = [(layer, e) for layer in (0, 1) for e in range(8)]  # every token routed to the set overflows
    engine = ExpertEngine(
        tiny,
        slots=12,
        max_sets=4,
        weight_bound=math.inf,
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=8,
    )
    engine.load(alpha)
    ref = {(s, p): answer(engine, p, s) for s in (None, "alpha") for p in PROMPTS}
    yield dict(engine=engine, model=model, huge=huge_set(model, every), ref=ref)
    engine.shutdown()


def answer(engine, prompt: str, expert_set: str | None) -> list[int]:
    return list(generate(engine, [prompt], [expert_set])[0])


def generate(engine, prompts: list[str], sets: list[str | None]) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in engine.generate(prompts, sets, params)]


def non_finite_kv(engine) -> int:
    """Values in the engine's KV cache that are NaN or inf (every layer, every block)."""

    def count(worker):
        return sum(int((~torch.isfinite(kv)).sum()) for kv in worker.model_runner.kv_caches)

    return sum(engine.llm.collective_rpc(count))


def others_equal_reference(world, rounds: int = 2) -> None:
    """Base and alpha, alone and mixed, prompts in changing order and lengths: their reference answers."""
    engine, ref = world["engine"], world["ref"]
    for r in range(rounds):
        order = PROMPTS[r:] + PROMPTS[:r]
        sets = [None if i % 2 == r % 2 else "alpha" for i in range(len(order))]
        assert generate(engine, order, sets) == [ref[(s, p)] for s, p in zip(sets, order, strict=True)]
        for p in order[:2]:
            assert answer(engine, p, None) == ref[(None, p)]


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_reports_the_base_statistics(world):
    """The workers' statistics (read from their kernel-layout weights) are the base's own maxima."""
    infos = world["engine"].llm.collective_rpc("expertlib_info")
    got = {(layer, part): v for layer, part, v in infos[0]["weight_absmax"]}
    want = model_absmax(world["model"])
    assert got.keys() == want.keys()
    assert all(math.isclose(got[k], want[k], rel_tol=1e-6) for k in want)


@pytest.mark.vllm
@pytest.mark.slow
def test_nan_set_cannot_reach_other_requests_or_outlive_its_own(world):
    """A set that overflows to inf/NaN on every token, in mixed batches with the base and another set:
    the others answer their reference in the same batch, in every later batch while it stays loaded,
    and after it is unloaded; no NaN/inf is left in the KV cache."""
    engine, ref = world["engine"], world["ref"]
    engine.load(world["huge"])
    try:
        for _ in range(2):
            sets = [s for _ in PROMPTS for s in (None, "alpha", "huge")]
            prompts = [p for p in PROMPTS for _ in range(3)]
            got = generate(engine, prompts, sets)
            for p, s, g in zip(prompts, sets, got, strict=True):
                if s != "huge":
                    assert g == ref[(s, p)], (s, p)
            assert generate(engine, PROMPTS, ["huge"] * len(PROMPTS))  # alone, and long
            others_equal_reference(world)
        assert non_finite_kv(engine) == 0
    finally:
        engine.unload("huge")
    others_equal_reference(world, rounds=3)
    assert non_finite_kv(engine) == 0


@pytest.mark.vllm
@pytest.mark.slow
def test_without_containment_nan_outlives_the_request(world, monkeypatch):
    """The channel, shown with containment switched off: the set's request leaves NaN in KV cache
    blocks, and requests for the base that get those blocks next answer differently (blank)."""
    from expertlib.vllm_plugin.routing import SlotContext

    engine, ref = world["engine"], world["ref"]
    monkeypatch.setattr(SlotContext, "contain", lambda self, out: out)
    engine.load(world["huge"])
    try:
        generate(engine, [PROMPTS[4]], ["huge"])
        assert non_finite_kv(engine) > 0
        later = generate(engine, PROMPTS[:4], [None] * 4)
        assert later != [ref[(None, p)] for p in PROMPTS[:4]]
    finally:
        engine.unload("huge")

        def scrub(worker):
            for kv in worker.model_runner.kv_caches:
                kv.nan_to_num_(0.0, 0.0, 0.0)

        engine.llm.collective_rpc(scrub)  # leave the module's engine clean


# --- the worker dies with the server ---------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
def test_worker_dies_with_the_server(tiny, tmp_path):
    """`kill -9` of `expertlib serve` (vLLM's engine core in its own process, as in production): the
    engine core process is gone within a few seconds instead of running on."""
    import psutil
    from server_process import TEST_ENV, ServerProcess, free_port, serve_argv

    pytest.importorskip("vllm")
    port = free_port()
    argv = serve_argv(str(tiny), "--port", str(port), "--slots", "2", "--max-sets", "1")
    argv += ["--engine-arg", "enforce_eager=true", "--engine-arg", "max_model_len=128"]
    env = {**os.environ, **TEST_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with ServerProcess(argv, port, tmp_path / "server.log", env=env) as server:
        server.wait_ready()
        children = psutil.Process(server.proc.pid).children(recursive=True)
        assert children, "the engine core should run in its own process"
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        deadline = time.time() + 15
        alive = children
        while alive and time.time() < deadline:
            time.sleep(0.25)
            alive = [c for c in alive if _running(c)]
        for c in alive:  # do not leave them behind when the test fails
            c.kill()
        assert not alive, f"still running after the server was killed: {[c.pid for c in alive]}"


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_PARENT = """
import multiprocessing as mp, sys, time
from expertlib.vllm_plugin import lifeline

def child():
    from expertlib.vllm_plugin import lifeline  # a spawned child loads the plugin again, as vLLM's do
    lifeline.install()
    time.sleep(120)

if __name__ == "__main__":
    lifeline.install()  # what the plugin does in the server process
    p = mp.get_context(sys.argv[1]).Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_die_with_their_parent(tmp_path, method):
    """The lifeline without vLLM: a forked child (vLLM's default) and a spawned one stop within a few
    seconds of their parent's SIGKILL."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), method], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # the child is up and watching
        assert _running(child)
        parent.kill()
        parent.wait(10)
        deadline = time.time() + 10
        while _running(child) and time.time() < deadline:
            time.sleep(0.1)
        alive = _running(child)
        if alive:
            child.kill()
        assert not alive
    finally:
        parent.kill()
