"""The top-p selection rule and the reference expert_cfg.json shape, on hand-computed cases."""

from __future__ import annotations

import json

import pytest

from expertlib.errors import SelectionError
from expertlib.esft.selection import ExpertConfig, keep_layer, select_experts, top_p_layer


@pytest.mark.parametrize(
    ("scores", "p", "cap", "want"),
    [
        ([0.1, 0.5, 0.3, 0.1], 0.2, None, [1]),  # 0.5 >= 0.2 at once
        ([0.1, 0.5, 0.3, 0.1], 0.6, None, [1, 2]),  # 0.5, 0.8
        ([0.1, 0.5, 0.3, 0.1], 0.8, None, [1, 2]),  # reaching p exactly stops
        ([0.1, 0.5, 0.3, 0.1], 0.81, None, [0, 1, 2]),  # tie 0.1/0.1: lower id first
        ([0.7, 0.2, 0.1, 0.0], 1.0, None, [0, 1, 2]),  # 0.7+0.2+0.1 rounds below 1.0: slack stops
        ([0.25, 0.25, 0.25, 0.25], 0.9, 2, [0, 1]),  # cap per layer
        ([0.0, 0.0, 0.0], 0.1, None, [0, 1, 2]),  # nothing reaches p: all (never empty)
        ([0.01, 0.02, 0.03], 0.001, None, [2]),  # at least one expert
        ([0.05, 0.02, 0.03], 0.1, None, [0, 1, 2]),  # gate-style absolute threshold: sum 0.1
    ],
)
def test_top_p_layer(scores, p, cap, want):
    assert top_p_layer(scores, p, max_experts=cap) == want


def test_reference_rule_has_no_slack():
    """The reference compares the float running sum without slack: 0.7+0.2+0.1 < 1.0 there,
    so it takes the next expert too; with eps=0 we do the same."""
    assert top_p_layer([0.7, 0.2, 0.1, 0.0], 1.0, eps=0.0) == [0, 1, 2, 3]
    assert select_experts({1: [0.1, 0.7, 0.0, 0.2]}, 1.0, eps=0.0).experts == {1: [0, 1, 2, 3]}
    assert select_experts({1: [0.1, 0.7, 0.0, 0.2]}, 1.0).experts == {1: [0, 1, 3]}


def test_select_per_layer_and_reference_shape(tmp_path):
    cfg = select_experts({1: [0.6, 0.3, 0.1], 2: [0.1, 0.1, 0.8]}, 0.7)
    assert cfg.experts == {1: [0, 1], 2: [2]}
    path = cfg.save(tmp_path / "experts.json")
    raw = json.loads(path.read_text())
    assert raw == {"experts": {"1": [0, 1], "2": [2]}, "shared_experts": False, "non_expert_modules": False}
    assert ExpertConfig.load(path) == cfg
    # the reference loader needs every MoE layer as a key, empty where nothing trains
    path = cfg.save(tmp_path / "all.json", moe_layers=[0, 1, 2, 3])
    assert json.loads(path.read_text())["experts"] == {"0": [], "1": [0, 1], "2": [2], "3": []}


def test_reads_reference_expert_cfg(tmp_path):
    ref = {"experts": {"1": [5, 3], "2": [0]}, "shared_experts": True, "non_expert_modules": False}
    (tmp_path / "expert_cfg.json").write_text(json.dumps(ref))
    cfg = ExpertConfig.load(tmp_path / "expert_cfg.json")
    assert cfg.experts == {1: [3, 5], 2: [0]} and cfg.shared_experts and cfg.num_experts == 3
    cfg.check_against([1, 2], 8)
    with pytest.raises(SelectionError, match="not MoE layers"):
        cfg.check_against([2], 8)
    with pytest.raises(SelectionError, match="out of range"):
        cfg.check_against([1, 2], 4)


def test_bad_inputs(tmp_path):
    (tmp_path / "x.json").write_text('{"experts": {"1": [1, 1]}}')
    with pytest.raises(SelectionError, match="not a valid expert config"):
        ExpertConfig.load(tmp_path / "x.json")
    with pytest.raises(SelectionError):
        top_p_layer([0.5], 0.0)
    with pytest.raises(SelectionError):
        top_p_layer([0.5], 0.2, max_experts=0)


# --- retention-aware selection (--keep) ---------------------------------------------------------------

TASK = [0.5, 0.3, 0.1, 0.1]
KEPT = [0.3, 0.05, 0.05, 0.6]  # the kept data routes through expert 0 (and 3, which the task barely uses)


def test_keep_budget_drops_the_experts_the_kept_data_routes_through():
    assert top_p_layer(TASK, 0.7) == [0, 1]  # the paper's set carries 0.35 of the kept routing
    assert keep_layer(TASK, 0.7, [KEPT], mode="budget", keep_share=0.1) == [1]  # expert 0 alone carries 0.3
    assert keep_layer(TASK, 0.7, [KEPT], mode="budget", keep_share=0.35) == [
        0,
        1,
    ]  # within the budget: the paper's set
    assert keep_layer(TASK, 0.7, []) == [0, 1]  # nothing kept: the paper's rule
    # every kept dataset must stay under the budget; a layer may end up empty
    assert keep_layer(TASK, 0.7, [KEPT, [0.0, 0.5, 0.25, 0.25]], mode="budget", keep_share=0.1) == []
    # shares are normalised: raw counts give the same answer
    assert keep_layer(TASK, 0.7, [[6, 1, 1, 12]], mode="budget", keep_share=0.1) == [1]


def test_keep_contrast_ranks_task_against_kept_relevance():
    # task - kept: [0.2, 0.25, 0.05, 0] -> normalised [0.4, 0.5, 0.1, 0]: p 0.7 takes 1 then 0
    assert keep_layer(TASK, 0.7, [KEPT], mode="contrast") == [0, 1]
    assert keep_layer(TASK, 0.7, [KEPT]) == [1, 2]  # the default, capped-wide: within the kept share
    assert keep_layer(TASK, 0.4, [KEPT], mode="contrast") == [1]
    assert keep_layer(TASK, 0.7, [TASK], mode="contrast") == []  # the task is all kept routing


def test_keep_capped_ranks_by_contrast_within_the_share():
    # contrast [0.4, 0.5, 0.1, 0] takes 1 then 0, and expert 0 carries 0.3 of the kept routing;
    # capped takes 1 (0.05 kept), skips 0 (0.35 > 0.1) and takes 2 in its place (0.10): as many
    # experts as contrast, within the share
    assert keep_layer(TASK, 0.7, [KEPT], mode="contrast") == [0, 1]
    assert keep_layer(TASK, 0.7, [KEPT], mode="capped", keep_share=0.1) == [1, 2]
    assert keep_layer(TASK, 0.7, [KEPT], mode="capped", keep_share=0.35) == [0, 1]  # within: contrast's
    assert keep_layer(TASK, 0.4, [KEPT], mode="capped", keep_share=0.1) == [1]  # p reached: no more
    # nothing fits: empty; nothing positive in the contrast: empty
    assert keep_layer(TASK, 0.7, [KEPT], mode="capped", keep_share=0.01) == []
    assert keep_layer(TASK, 0.7, [TASK], mode="capped") == []
    with pytest.raises(SelectionError, match="unknown keep mode"):
        keep_layer(TASK, 0.7, [KEPT], mode="loose")


# a layer where the kept data leaves one expert all the contrast: contrast's count (1) is under the
# paper's (2), the ESFT-Token top-p count of the task's own routing
WIDE_TASK = [0.30, 0.25, 0.20, 0.15, 0.05, 0.05]
WIDE_KEPT = [0.0, 0.20, 0.05, 0.05, 0.30, 0.40]  # contrast: [0.5, 0.083, 0.25, 0.167, 0, 0]


def test_keep_capped_wide_fills_to_the_papers_count_within_the_share():
    assert top_p_layer(WIDE_TASK, 0.4) == [0, 1]  # the paper's count: 2
    assert keep_layer(WIDE_TASK, 0.4, [WIDE_KEPT], mode="capped") == [0]  # contrast 0.5 >= p at once
    # capped-wide goes on in contrast order within the share: 2 (0.05 kept) reaches p of the
    # task's routing (0.30 + 0.20); expert 1 (0.20 kept) never trains
    assert keep_layer(WIDE_TASK, 0.4, [WIDE_KEPT], mode="capped-wide") == [0, 2]
    assert keep_layer(WIDE_TASK, 0.4, [WIDE_KEPT]) == [0, 2]  # the default
    # p 0.6: the paper's count 3; 0, 2 and then 3 (0.10 kept, at the bound)
    assert top_p_layer(WIDE_TASK, 0.6) == [0, 1, 2]
    assert keep_layer(WIDE_TASK, 0.6, [WIDE_KEPT], mode="capped-wide") == [0, 2, 3]
    # the bound still holds: at 0.01 nothing but expert 0 fits
    assert keep_layer(WIDE_TASK, 0.4, [WIDE_KEPT], mode="capped-wide", keep_share=0.01) == [0]
    # the count stops it before the task's top-p: the paper's set is one expert, contrast's two
    task, kept = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert top_p_layer(task, 0.4) == [0]
    assert keep_layer(task, 0.4, [kept], mode="capped-wide") == [1, 2]  # capped's, never fewer
    assert keep_layer(task, 0.4, [task], mode="capped-wide") == []  # all kept routing
    assert select_experts({0: WIDE_TASK}, 0.4, keep=[{0: WIDE_KEPT}], keep_mode="capped-wide").experts == {
        0: [0, 2]
    }


def test_keep_capped_wide_holds_cappeds_experts_on_random_layers():
    import random

    rng = random.Random(0)
    wider = 0
    for _ in range(500):
        n = rng.randint(2, 12)
        task = [rng.random() ** 3 for _ in range(n)]
        kept = [rng.random() ** 3 for _ in range(n)]
        p, share = rng.choice([0.2, 0.4, 0.7]), rng.choice([0.05, 0.1, 0.3])
        capped = keep_layer(task, p, [kept], mode="capped", keep_share=share)
        wide = keep_layer(task, p, [kept], mode="capped-wide", keep_share=share)
        contrast = keep_layer(task, p, [kept], mode="contrast")
        assert set(capped) <= set(wide)
        assert len(wide) <= max(len(top_p_layer(task, p)), len(contrast))
        assert sum(kept[e] for e in wide) / sum(kept) <= share + 1e-9
        wider += len(wide) > len(capped)
    assert wider >= 10  # it does widen (13 of these 500 layers)


def test_select_experts_with_keep_per_layer():
    scores = {0: TASK, 1: [0.1, 0.1, 0.1, 0.7]}
    kept = {0: KEPT, 1: [0.25, 0.25, 0.25, 0.25]}
    assert select_experts(scores, 0.7).experts == {0: [0, 1], 1: [3]}
    budget = {"keep_mode": "budget"}
    assert select_experts(scores, 0.7, keep=[kept], **budget).experts == {0: [1], 1: []}
    assert select_experts(scores, 0.7, keep=[kept], keep_share=0.25, **budget).experts == {0: [1], 1: [3]}
    # contrast: layer 1's task - kept = [0, 0, 0, 0.45]: expert 3 alone
    assert select_experts(scores, 0.7, keep=[kept], keep_mode="contrast").experts == {0: [0, 1], 1: [3]}
    # capped-wide (the default): expert 3 carries 0.25 of the kept routing, past 0.1: layer 1 trains nothing
    assert select_experts(scores, 0.7, keep=[kept]).experts == {0: [1, 2], 1: []}
    with pytest.raises(SelectionError, match="no kept routing for MoE layer 1"):
        select_experts(scores, 0.7, keep=[{0: KEPT}])
    with pytest.raises(SelectionError, match="experts"):
        keep_layer(TASK, 0.7, [[0.5, 0.5]])


def test_keep_capped_wide_counts_with_the_scores_it_is_given():
    """capped-wide's count is the paper's top-p count of `count_scores` (train passes the scores with
    every token counted) where given, else of the scores it ranks."""
    task, kept = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    every = [0.16, 0.16, 0.16, 0.16, 0.16, 0.2]  # top-p 0.4: three experts
    assert top_p_layer(task, 0.4) == [0] and top_p_layer(every, 0.4) == [0, 1, 5]
    assert keep_layer(task, 0.4, [kept], mode="capped-wide") == [1, 2]  # contrast's count, 2
    assert keep_layer(task, 0.4, [kept], mode="capped-wide", count_scores=every) == [1, 2, 3]
    # the paper's count even where the experts taken carry top-p of the ranked scores already
    # (expert 1: 0.3 of the task's answer-only routing at p 0.3)
    ranked, kept_first = [0.4, 0.3, 0.1, 0.1, 0.1], [0.4, 0.0, 0.0, 0.0, 0.0]
    wide = [0.19, 0.19, 0.19, 0.19, 0.24]  # top-p 0.3: two experts
    assert keep_layer(ranked, 0.3, [kept_first], mode="capped-wide", count_scores=wide) == [1, 2]
    # capped is not affected; the bound still holds
    assert keep_layer(task, 0.4, [kept], mode="capped", count_scores=every) == [1, 2]
    bounded = [0.5, 0.0, 0.0, 0.05, 0.45, 0.0]  # 3 over the share, 4 all kept
    assert keep_layer(task, 0.4, [bounded], mode="capped-wide", count_scores=every, keep_share=0.01) == [
        1,
        2,
        5,
    ]
    got = select_experts({0: task}, 0.4, keep=[{0: kept}], keep_mode="capped-wide", count_scores={0: every})
    assert got.experts == {0: [1, 2, 3]}
