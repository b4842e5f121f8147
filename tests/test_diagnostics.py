"""Specialisation and retention-risk diagnostics: exact figures on hand-made routing shares."""

from __future__ import annotations

import pytest

from expertlib.esft.diagnostics import (
    ADVICE,
    builtin_general_samples,
    concentration,
    format_specialisation,
    retention_risk,
    specialisation,
    top_experts,
    top_overlap,
)
from expertlib.esft.selection import ExpertConfig
from expertlib.testing import make_tokenizer

# two layers, 8 experts: "math" routes through 0-1, "text" through 6-7, general spreads over all
MATH = {0: [0.4, 0.4, 0.05, 0.05, 0.05, 0.05, 0, 0], 1: [0.5, 0.3, 0.1, 0.1, 0, 0, 0, 0]}
TEXT = {0: [0, 0, 0.05, 0.05, 0.05, 0.05, 0.4, 0.4], 1: [0, 0, 0, 0, 0.1, 0.1, 0.3, 0.5]}
GENERAL = {0: [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 1: [0.125] * 8}


def test_retention_risk_is_the_general_mass_on_the_selected_experts():
    risk = retention_risk(ExpertConfig(experts={0: [0, 1], 1: [0]}), GENERAL, task=MATH, threshold=0.2)
    by = {r.layer: r for r in risk.layers}
    assert by[0].general_mass == pytest.approx(0.4) and by[1].general_mass == pytest.approx(0.125)
    assert by[0].task_mass == pytest.approx(0.8) and by[1].task_mass == pytest.approx(0.5)
    assert by[0].chance == pytest.approx(0.25) and by[1].chance == pytest.approx(0.125)
    assert risk.mean_general_mass == pytest.approx(0.2625) and risk.max_general_mass == pytest.approx(0.4)
    assert risk.at_risk == [0]
    assert retention_risk({0: [0, 1], 1: [0]}, GENERAL).at_risk == [0, 1]  # default threshold 0.1
    msg = risk.message()
    assert "layers 0 " in msg and all(a in msg for a in ADVICE)
    s = risk.summary()
    assert s["at_risk_layers"] == [0] and s["per_layer"]["0"]["experts"] == [0, 1]


def test_low_risk_when_the_selection_avoids_general_routing():
    risk = retention_risk({0: [6], 1: [7]}, GENERAL, threshold=0.2)
    assert risk.at_risk == []
    assert risk.message().startswith("retention risk low")
    assert retention_risk({0: [6], 1: [7]}, GENERAL, threshold=0.11).at_risk == [1]


def test_retention_risk_needs_every_selected_layer():
    with pytest.raises(KeyError, match="layer 2"):
        retention_risk({2: [0]}, GENERAL)


def test_concentration_and_overlap():
    assert top_experts([0.1, 0.5, 0.1, 0.3], 2) == [1, 3]
    assert top_experts([0.2, 0.2, 0.2], 2) == [0, 1]  # ties: lower id first
    c = concentration(MATH, 2)
    assert c[0] == pytest.approx(0.8) and c[1] == pytest.approx(0.8)
    assert top_overlap(MATH, TEXT, 2) == {0: 0.0, 1: 0.0}
    assert top_overlap(MATH, MATH, 2) == {0: 1.0, 1: 1.0}
    # general's top-2 is {0, 1} in both layers (ties go to lower ids): math's experts, not text's
    assert top_overlap(MATH, GENERAL, 2) == {0: 1.0, 1: 1.0}
    assert top_overlap(TEXT, GENERAL, 2) == {0: 0.0, 1: 0.0}


def test_specialisation_table():
    spec = specialisation({"math": MATH, "text": TEXT, "general": GENERAL}, k=2)
    assert spec.chance == pytest.approx(0.25)
    assert spec.concentration["math"] == pytest.approx(0.8)
    assert spec.concentration["general"] == pytest.approx((0.4 + 0.25) / 2)
    assert spec.overlap["math"]["text"] == 0.0 and spec.overlap["text"]["text"] == 1.0
    text = format_specialisation(spec)
    assert "top 2 of 8" in text and "0.80" in text and "overlap" in text


def test_builtin_general_set_covers_the_general_tasks():
    from expertlib.demo.base import SHIPPED_DIR
    from expertlib.demo.tasks import GENERAL_TASKS

    samples = builtin_general_samples(SHIPPED_DIR, make_tokenizer(), n_per_task=3)
    assert len(samples) == 3 * len(GENERAL_TASKS)
    assert all(any(y != -100 for y in s.labels) for s in samples)


def test_builtin_data_is_what_the_base_ships(tmp_path):
    """`builtin` general data and the base anchors come from the base folder (the demo base ships
    them), not from the demo's code; a base that ships none gets a clear error for `builtin`."""
    from expertlib.demo.base import SHIPPED_DIR, DemoBaseConfig
    from expertlib.errors import DataError
    from expertlib.esft.keep import ships_general_data
    from expertlib.esft.profiling import ANCHOR_PROMPTS, anchor_samples

    tok = make_tokenizer()
    anchors = anchor_samples(SHIPPED_DIR, None, tok)  # shipped: no model needed
    assert sorted(anchors) == sorted(DemoBaseConfig().tasks)
    assert {len(v) for v in anchors.values()} == {ANCHOR_PROMPTS}
    assert ships_general_data(SHIPPED_DIR) and not ships_general_data(tmp_path)
    with pytest.raises(DataError, match="ships no general reference data") as err:
        builtin_general_samples(tmp_path, tok)
    assert err.value.hint and "jsonl" in err.value.hint


def test_diff_reports_the_general_mass_of_each_set():
    from types import SimpleNamespace

    from expertlib.registry.diff import add_general_overlap

    layers = [
        SimpleNamespace(layer=0, experts={"math": [0, 1], "text": [6]}),
        SimpleNamespace(layer=1, experts={"math": [0], "text": []}),
    ]
    report = SimpleNamespace(labels=["math", "text"], layers=layers, general=None)
    add_general_overlap(report, GENERAL)
    assert report.general["math"]["mean_general_mass"] == pytest.approx((0.4 + 0.125) / 2)
    assert report.general["math"]["at_risk_layers"] == [0, 1]  # 0.4 and 0.125 > 0.1
    assert report.general["text"]["mean_general_mass"] == pytest.approx(0.1)
    assert list(report.general["text"]["per_layer"]) == ["0"]  # a layer the set does not touch is left out


@pytest.mark.slow
def test_score_and_train_report_the_retention_risk(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from expertlib.cli.main import cli
    from expertlib.demo.base import build_demo_base
    from expertlib.demo.tasks import get_task, write_jsonl
    from expertlib.esft.diagnostics import DEFAULT_RISK_THRESHOLD

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    base = str(build_demo_base(progress=False))

    def score(task: str) -> tuple:
        """`expertlib score --general builtin --json` on 64 samples of `task`: (data path, output)."""
        data = write_jsonl(get_task(task).split(n_train=64, n_eval=1).train, tmp_path / f"{task}.jsonl")
        res = CliRunner().invoke(
            cli,
            ["score", base, str(data), "--out", str(tmp_path / f"{task}.scores.json"), "--budget", "2000"]
            + ["--all-tokens", "--general", "builtin", "--json"],
        )
        assert res.exit_code == 0, res.output
        return data, json.loads(res.stdout[res.stdout.index("{") :])

    data, out = score("open")
    risk = out["retention_risk"]["esft-token p=0.2"]
    assert set(risk["per_layer"]) == {"0", "1", "2", "3"}
    assert risk["at_risk_layers"], risk  # `open` answers through the general tasks' experts
    assert 0 < risk["mean_general_mass"] < 1 and risk["threshold"] == DEFAULT_RISK_THRESHOLD
    spec = out["specialisation"]
    assert set(spec["concentration"]) == {"task", "general"} and spec["k"] == 4

    # `sum` (numbers, its own experts on the demo base) is not flagged: the check separates the two
    calm = score("sum")[1]["retention_risk"]["esft-token p=0.2"]
    assert not calm["at_risk_layers"] and calm["mean_general_mass"] < risk["mean_general_mass"] / 2, calm

    res = CliRunner().invoke(
        cli,
        ["train", base, str(data), "--task", "open", "--out", str(tmp_path / "m.safetensors")]
        + ["--steps", "2", "--lr", "1e-3", "--budget", "2000", "--all-tokens", "--general", "builtin"]
        + ["--keep", "none", "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out["retention_risk"]["per_layer"]["0"]["experts"], out
    assert "retention risk" in res.stderr and "--keep builtin" in res.stderr.split("train with:")[1]
    # the check's figures are kept in the set's manifest, where `show` and the web view's set page read them
    from expertlib.patch import ExpertSet

    kept = ExpertSet.open(tmp_path / "m.safetensors").manifest.provenance.extra["retention_risk"]
    assert kept == json.loads(json.dumps(out["retention_risk"])), kept

    res = CliRunner().invoke(cli, ["inspect", base, "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "specialisation: share of routing mass" in res.output
