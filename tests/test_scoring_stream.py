"""Streaming scoring: lazily read data gives the same scores, in memory that does not grow with the file."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from expertlib.errors import DataError
from expertlib.esft.data import LazySamples, load_samples
from expertlib.esft.scoring import score_experts
from expertlib.testing import make_tiny_model, make_tokenizer


def write(path, n: int, width: int = 30):
    rows = [{"prompt": f"q{i} " + "x" * width, "completion": f"a{i} " + "y" * width} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is no record
    return path


def test_lazy_samples_read_what_load_samples_reads(tmp_path):
    tok = make_tokenizer()
    p = write(tmp_path / "d.jsonl", 5)
    lazy = LazySamples(p, tok, max_length=4096)
    assert len(lazy) == 5 and list(lazy) == load_samples(p, tok, max_length=4096)
    assert lazy[3].line == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    with pytest.raises(DataError, match="line 2|:2:"):
        LazySamples(bad, tok)[1]
    skipped = LazySamples(p, tok, max_length=10, too_long="skip")
    assert skipped[0] is None


@pytest.mark.slow
def test_scores_equal_and_memory_does_not_grow_with_the_data(tmp_path):
    tok = make_tokenizer()
    model = make_tiny_model("qwen3_moe")
    small = write(tmp_path / "small.jsonl", 16)
    big = write(tmp_path / "big.jsonl", 96)
    eager = score_experts(
        model, load_samples(small, tok, max_length=4096), pad_id=0, token_budget=None, progress=False
    )
    lazy = score_experts(
        model, LazySamples(small, tok, max_length=4096), pad_id=0, token_budget=None, progress=False
    )
    assert lazy.tokens_scored == eager.tokens_scored and lazy.sequences == 16
    for layer, scores in eager.token.items():
        assert lazy.token[layer] == pytest.approx(scores, abs=1e-12)

    def peak(make) -> int:
        """Peak Python memory of building the samples and scoring them (tensors are not traced)."""
        tracemalloc.start()
        try:
            score_experts(model, make(), pad_id=0, token_budget=None, batch_size=8, progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(lambda: LazySamples(small, tok, max_length=4096))  # warm-up: first-call imports, templates
    lazy = peak(lambda: LazySamples(big, tok, max_length=4096))
    eager = peak(lambda: load_samples(big, tok, max_length=4096))
    tracemalloc.start()
    held = load_samples(big, tok, max_length=4096)
    data_bytes = tracemalloc.get_traced_memory()[0]  # what holding the tokenised file costs
    tracemalloc.stop()
    del held
    # the lazy pass never holds the tokenised file: it saves at least most of those bytes
    assert lazy < eager - 0.6 * data_bytes, (lazy, eager, data_bytes)
