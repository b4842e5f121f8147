"""vLLM's compiled (non-eager) mode, where the model is traced once during warm-up: the slot remap
survives it (a Python-side shortcut in the router would be frozen there and silently drop every
set), and so does the routing capture of `model="auto"`. One compiled engine serves both."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.apply import apply_expert_set  # noqa: E402
from expertlib.moe import load_model  # noqa: E402
from expertlib.vllm_plugin.testing import hf_greedy, make_vllm_tiny_base, random_expert_set  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny qwen2_moe base and a compiled engine on it (dynamo traces the model once; backend
    "eager" skips inductor's codegen)."""
    from expertlib.engine import ExpertEngine

    base_dir = tmp_path_factory.mktemp("compiled") / "base"
    top_k = make_vllm_tiny_base("qwen2_moe", base_dir).config.num_experts_per_tok
    engine = ExpertEngine(
        base_dir,
        slots=8,
        max_sets=2,
        enforce_eager=False,
        compilation_config={"backend": "eager"},
        dtype="float32",
        max_model_len=128,
        max_num_seqs=4,
    )
    yield base_dir, engine, top_k
    engine.shutdown()


def test_sets_apply_when_the_model_is_compiled(compiled, tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    base_dir, engine, _ = compiled
    model = load_model(base_dir)
    es = random_expert_set(model, "alpha", {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, seed=3, scale=1.0)
    path = es.save(tmp_path / "alpha.safetensors")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = ["Hello world", "The cat sat on"]
    with apply_expert_set(model, es):
        want = [hf_greedy(model, tok, p, 8) for p in prompts]

    engine.load(path)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    got = [
        list(o.outputs[0].token_ids)
        for o in engine.generate(prompts, expert_set="alpha", sampling_params=greedy)
    ]
    base = [
        list(o.outputs[0].token_ids)
        for o in engine.generate(prompts, expert_set=None, sampling_params=greedy)
    ]
    assert got == want
    assert got != base


def test_a_compiled_engine_counts_a_captured_prompt(compiled):
    """Compiled mode traces the router once, at warm-up, when nothing is captured: the count must be
    in the traced graph all the same, or model="auto" would see no routing there."""
    from vllm import SamplingParams

    from expertlib.vllm_plugin import CAPTURE_KEY

    _, engine, top_k = compiled
    ids = list(range(5, 17))  # 12 prompt tokens
    for row in (1, 0):  # captured, then a plain base request
        extra = {CAPTURE_KEY: row} if row else {}
        params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
        engine.generate({"prompt_token_ids": ids, "cache_salt": f"t{row}"}, None, params)
        counts = engine.llm.collective_rpc("expertlib_take_routing", args=(1,))[0]
        totals = {float(sum(v)) for v in counts.values()}
        assert totals == ({float(len(ids) * top_k)} if row else {0.0}), counts
