"""The slot remap survives vLLM's compiled (non-eager) mode, where the model is traced once during
warm-up: a Python-side shortcut in the router would be frozen there and silently drop every set."""

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


def test_sets_apply_when_the_model_is_compiled(tmp_path):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine

    base_dir = tmp_path / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    model = load_model(base_dir)
    es = random_expert_set(model, "alpha", {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, seed=3, scale=1.0)
    path = es.save(tmp_path / "alpha.safetensors")
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = ["Hello world", "The cat sat on"]
    with apply_expert_set(model, es):
        want = [hf_greedy(model, tok, p, 8) for p in prompts]

    # enforce_eager=False: dynamo traces the model once (backend "eager" skips inductor's codegen)
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
