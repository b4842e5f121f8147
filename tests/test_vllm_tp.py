"""Expert slots under tensor parallelism (tp=2 on the CPU backend, one thread per rank): each rank
writes its shard of a set's experts into its slots, and outputs equal the set applied in place."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.apply import apply_expert_set  # noqa: E402
from expertlib.moe import load_model  # noqa: E402
from expertlib.vllm_plugin.testing import hf_greedy, make_vllm_tiny_base, random_expert_set  # noqa: E402

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tp=2 on the CPU backend needs 2 CPUs"),
]

PROMPTS = ["Hello world", "The cat sat on", "def f(x):"]
MAX_TOKENS = 16


def _rank_partition(worker):
    """(tp rank, MoE intermediate size held by this rank) on one worker."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner.get_model().expertlib_slots.layers[0]
    return get_tensor_model_parallel_rank(), runner.moe_config.intermediate_size_per_partition


def test_tensor_parallel_slots_match_in_place(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine

    # the CPU backend binds each rank's OpenMP threads to its own cores; one NUMA node needs a manual list
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an engine started earlier in this process froze the env values
    base_dir = tmp_path / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    model = load_model(base_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    sets = {
        "alpha": random_expert_set(model, "alpha", {0: [1, 3], 1: [0, 5]}, seed=1),
        "beta": random_expert_set(model, "beta", {0: [3], 1: [2, 6, 7]}, seed=2),
    }
    paths = {name: es.save(tmp_path / f"{name}.safetensors") for name, es in sets.items()}
    want = {None: [hf_greedy(model, tok, p, MAX_TOKENS) for p in PROMPTS]}
    for name, es in sets.items():
        with apply_expert_set(model, es):
            want[name] = [hf_greedy(model, tok, p, MAX_TOKENS) for p in PROMPTS]
    assert want["alpha"] != want[None] and want["beta"] != want[None]

    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    kw = dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=8)
    with ExpertEngine(base_dir, slots=5, max_sets=2, tensor_parallel_size=2, **kw) as engine:
        parts = dict(engine.llm.collective_rpc(_rank_partition))
        half = model.config.moe_intermediate_size // 2
        assert parts == {0: half, 1: half}  # two ranks, each holding half of every expert
        for name in sets:
            engine.load(paths[name])
        order = [None, "alpha", "beta"]
        prompts = [p for p in PROMPTS for _ in order]
        chosen = [s for _ in PROMPTS for s in order]
        outs = engine.generate(prompts, chosen, greedy)
        for i, (p, s) in enumerate(zip(prompts, chosen, strict=True)):
            assert list(outs[i].outputs[0].token_ids) == want[s][PROMPTS.index(p)], (p, s)
        # reload alpha after beta moved: it lands in other slots and must still be exact
        engine.unload("alpha")
        engine.unload("beta")
        engine.load(paths["beta"])
        engine.load(paths["alpha"])
        outs = engine.generate(PROMPTS, "alpha", greedy)
        assert [list(o.outputs[0].token_ids) for o in outs] == want["alpha"]
