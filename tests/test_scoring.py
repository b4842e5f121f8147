"""ESFT scores: a hand-built routing example against the formulas, then real forward passes."""

from __future__ import annotations

import json

import pytest
import torch

from expertlib.errors import SelectionError
from expertlib.esft.data import Sample, load_samples
from expertlib.esft.scoring import (
    ExpertScores,
    RoutingRecorder,
    budget_samples,
    score_experts,
    trained_positions,
)
from expertlib.moe import experts_module, moe_layer_indices
from expertlib.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def qwen():
    return make_tiny_model("qwen2_moe")


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tok):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"prompt": "what is " + "ab" * (i % 5), "completion": "c" * (3 + i % 7)} for i in range(12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_samples(p, tok)


def test_hand_built_routing_equals_formulas(qwen):
    """Two sequences (3 and 2 counted tokens, one padding position), K = 2, fed to the experts
    module directly. Hand computation of ESFT.md's formulas in the comments."""
    # seq A: tokens route to (0,1) (0,2) (1,0); seq B: (3,0) (3,1) and a padding token (7,6)
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 0], [3, 1], [7, 6]])
    w = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.4, 0.4], [0.9, 0.1], [0.7, 0.2], [0.5, 0.5]])
    count = torch.tensor([[True, True, True], [True, True, False]])
    layer = moe_layer_indices(qwen)[0]
    with RoutingRecorder(qwen) as rec, torch.no_grad():
        rec.set_batch(count)
        experts_module(qwen, layer)(torch.randn(6, qwen.config.hidden_size), ids, w)
    token, gate = rec.result()
    # Token: A: e0 3/(2*3), e1 2/6, e2 1/6;  B: e3 2/(2*2), e0 1/4, e1 1/4;  mean over N_s = 2
    want_token = [(0.5 + 0.25) / 2, (2 / 6 + 0.25) / 2, 1 / 12, 0.25, 0, 0, 0, 0]
    # Gate: A: e0 1.5/3, e1 0.7/3, e2 0.2/3;  B: e3 1.6/2, e0 0.1/2, e1 0.2/2
    want_gate = [(0.5 + 0.05) / 2, (0.7 / 3 + 0.1) / 2, 0.2 / 3 / 2, 0.8 / 2, 0, 0, 0, 0]
    assert token[layer] == pytest.approx(want_token, abs=1e-7)
    assert gate[layer] == pytest.approx(want_gate, abs=1e-7)
    assert sum(token[layer]) == pytest.approx(1.0)  # per-layer normalisation
    assert rec.sequences == 2 and rec.tokens == 5
    # reference weighting: the 5 tokens pooled, divided by 5 (x K for tokens), 4 decimals
    with RoutingRecorder(qwen, weighting="reference") as ref, torch.no_grad():
        ref.set_batch(count)
        experts_module(qwen, layer)(torch.randn(6, qwen.config.hidden_size), ids, w)
    token, gate = ref.result()
    assert token[layer] == [0.4, 0.3, 0.1, 0.2, 0, 0, 0, 0]  # slots 4, 3, 1, 2 of 10
    assert gate[layer] == [0.32, 0.18, 0.04, 0.32, 0, 0, 0, 0]  # 1.6, 0.9, 0.2, 1.6 over 5 tokens


def test_scores_are_per_layer_and_padding_free(qwen, samples):
    one = score_experts(qwen, samples, pad_id=0, batch_size=1, token_budget=None, progress=False)
    many = score_experts(qwen, samples, pad_id=0, batch_size=5, token_budget=None, progress=False)
    assert one.tokens_scored == many.tokens_scored == sum(len(s) for s in samples)
    assert one.sequences == len(samples)
    for layer in moe_layer_indices(qwen):
        assert sum(one.token[layer]) == pytest.approx(1.0)
        assert many.token[layer] == pytest.approx(one.token[layer], abs=1e-5)
        assert many.gate[layer] == pytest.approx(one.gate[layer], abs=1e-5)
        assert 0 < sum(one.gate[layer]) < 1  # qwen2_moe: unnormalised top-2 softmax mass


def test_answer_only_and_budget(qwen, samples):
    ans = score_experts(qwen, samples, pad_id=0, count_prompt_tokens=False, token_budget=None, progress=False)
    assert ans.tokens_scored == sum(s.num_answer_tokens for s in samples)
    everything = score_experts(qwen, samples, pad_id=0, token_budget=None, progress=False)
    assert ans.token != everything.token
    cut = score_experts(qwen, samples, pad_id=0, token_budget=50, seed=3, progress=False)
    assert cut.tokens_scored == 50 and cut.token_budget == 50
    chosen = budget_samples(samples, 50, count_prompt_tokens=True, seed=3)
    assert sum(t for _, t in chosen) == 50
    assert all(t == len(s) for s, t in chosen[:-1])  # whole samples, then...
    assert 0 < chosen[-1][1] < len(chosen[-1][0])  # ...the last one cut inside (50 is no boundary)
    # the cut sample scores exactly as its prefix would on its own
    prefixes = [Sample(s.input_ids[:t], s.labels[:t], s.line) for s, t in chosen]
    whole = score_experts(qwen, prefixes, pad_id=0, token_budget=None, progress=False)
    assert whole.tokens_scored == 50 and whole.sequences == cut.sequences
    for layer in cut.token:
        assert sum(cut.token[layer]) == pytest.approx(1.0)
        assert cut.token[layer] == pytest.approx(whole.token[layer], abs=1e-6)
        assert cut.gate[layer] == pytest.approx(whole.gate[layer], abs=1e-6)


def test_weighting_is_recorded_and_checked(qwen, samples):
    ref = score_experts(qwen, samples, pad_id=0, token_budget=None, progress=False, weighting="reference")
    paper = score_experts(qwen, samples, pad_id=0, token_budget=None, progress=False)
    assert (ref.weighting, paper.weighting) == ("reference", "paper")
    layer = next(iter(ref.token))
    assert all(round(x, 4) == x for x in ref.token[layer] + ref.gate[layer])
    assert sum(ref.token[layer]) == pytest.approx(1.0, abs=64 * 5e-5)
    assert ref.token[layer] != pytest.approx(paper.token[layer], abs=1e-4)  # samples differ in length
    with pytest.raises(SelectionError, match="unknown weighting"):
        score_experts(qwen, samples, pad_id=0, progress=False, weighting="pooled")


def test_scores_file_round_trip(tmp_path, qwen, samples):
    s = score_experts(qwen, samples, pad_id=0, token_budget=64, data_digest="sha256:x", progress=False)
    s.save(tmp_path / "scores.json")
    back = ExpertScores.load(tmp_path / "scores.json")
    assert back == s and back.of("gate") == s.gate
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SelectionError, match="not an expertlib scores file"):
        ExpertScores.load(tmp_path / "bad.json")


def test_every_architecture_scores(arch, samples):
    model = make_tiny_model(arch)
    s = score_experts(model, samples[:4], pad_id=0, token_budget=None, batch_size=2, progress=False)
    assert sorted(s.token) == moe_layer_indices(model)
    for layer in s.token:
        assert sum(s.token[layer]) == pytest.approx(1.0)
        assert min(s.gate[layer]) >= 0 and sum(s.gate[layer]) > 0


def test_answer_only_counts_the_positions_the_loss_trains(qwen, samples):
    # labels align with inputs: position t is trained when token t+1 is an answer token
    assert trained_positions([-100, -100, 7, 8, 2]) == [False, True, True, True, False]
    assert trained_positions([-100, 5, -100, 6]) == [True, False, True, False]
    assert trained_positions([]) == []
    # scoring counts exactly those positions: moving the counted window by one changes the scores
    ans = score_experts(qwen, samples, pad_id=0, count_prompt_tokens=False, token_budget=None, progress=False)
    shifted = [Sample(s.input_ids, (-100, *s.labels[:-1]), s.line) for s in samples]
    later = score_experts(
        qwen, shifted, pad_id=0, count_prompt_tokens=False, token_budget=None, progress=False
    )
    assert ans.tokens_scored == sum(sum(trained_positions(s.labels)) for s in samples)
    assert ans.token != later.token


def test_answer_only_budget_counts_what_the_mask_counts(qwen, samples):
    # a packed row can start inside an answer (labels[0] trained): position 0 is never a trained
    # position, so the budget must not count it either, or the whole row would be cut away
    rows = [Sample(s.input_ids, (s.input_ids[0], *s.labels[1:]), s.line) for s in samples]
    got = score_experts(qwen, rows, pad_id=0, count_prompt_tokens=False, token_budget=None, progress=False)
    assert got.sequences == len(rows)
    assert got.tokens_scored == sum(sum(trained_positions(s.labels)) for s in rows)


def test_every_token_scores_come_from_the_same_passes(qwen, samples):
    """Answer-only scoring can also count every position of the same samples in the same forward
    passes (capped-wide's count is the paper's, every token scored)."""
    kw = dict(pad_id=0, count_prompt_tokens=False, token_budget=None, progress=False)
    plain = score_experts(qwen, samples, **kw)
    both = score_experts(qwen, samples, **kw, every_token=True)
    assert plain.token_every is None and plain.every("token") == plain.token
    assert both.tokens_scored == plain.tokens_scored
    # each sample up to its last trained position, every position counted
    ends = [max(i for i, c in enumerate(trained_positions(s.labels)) if c) + 1 for s in samples]
    cut = [Sample(s.input_ids[:n], s.labels[:n], s.line) for s, n in zip(samples, ends, strict=True)]
    whole = score_experts(qwen, cut, pad_id=0, count_prompt_tokens=True, token_budget=None, progress=False)
    for layer in plain.token:
        assert both.token[layer] == pytest.approx(plain.token[layer], abs=1e-9)
        assert both.every("token")[layer] == pytest.approx(whole.token[layer], abs=1e-6)
        assert both.every("gate")[layer] == pytest.approx(whole.gate[layer], abs=1e-6)
    assert both.every("token") != both.token
