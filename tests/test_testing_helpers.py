"""The shared helpers of the tests and the GPU checks (`expertlib.testing`)."""

from __future__ import annotations

from types import SimpleNamespace

from expertlib.testing import first_greedy_gap


def _run(tokens: list[int], top: list[dict[int, float]]):
    """A vLLM RequestOutput's shape: greedy tokens and, per position, the top tokens' logprobs."""
    lps = [{t: SimpleNamespace(logprob=lp) for t, lp in row.items()} for row in top]
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=lps)])


def test_first_greedy_gap_finds_the_near_tie_where_two_runs_part():
    a = _run([5, 7, 9], [{5: -0.1}, {7: -0.50, 8: -0.52}, {9: -0.1}])
    b = _run([5, 8, 1], [{5: -0.1}, {8: -0.40, 7: -0.45}, {1: -0.1}])
    i, gap = first_greedy_gap(a, b)
    assert i == 1 and abs(gap - 0.02) < 1e-9  # the smaller of the two runs' gaps (0.02 and 0.05)
    assert first_greedy_gap(a, _run([5, 7], [{5: -0.1}, {7: -0.5}])) == (None, 0.0)  # one extends the other
    far = _run([5, 3, 9], [{5: -0.1}, {3: -0.2}, {9: -0.1}])
    assert first_greedy_gap(a, far) == (1, float("inf"))  # neither run has the other's choice in its top
