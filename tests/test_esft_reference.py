"""ESFT reference adapter folders (expert_cfg.json + full-weight safetensors) in and out."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from expertlib.apply import apply_expert_set, extract_expert_set
from expertlib.cli.main import cli
from expertlib.data import load_samples
from expertlib.errors import BaseMismatchError, PatchFormatError, PatchShapeError, SelectionError
from expertlib.esft_reference import export_esft, import_esft
from expertlib.moe import load_model, moe_layer_indices, read_expert, write_expert
from expertlib.patch import ExpertSet
from expertlib.reference_logs import score_reference_logs
from expertlib.scoring import ExpertScores
from expertlib.selection import select_experts
from expertlib.testing import make_tokenizer


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral", "qwen2_moe"])
def test_export_import_roundtrip(arch, tiny_model_dir, tmp_path):
    path = tiny_model_dir(arch)
    base = load_model(path)
    layers = moe_layer_indices(base)
    tuned = copy.deepcopy(base)
    for e in (2, 6):
        write_expert(tuned, layers[-1], e, read_expert(base, layers[-1], e).map(lambda t: t * 3))
    es = extract_expert_set(tuned, base, task="law")
    folder = export_esft(es, tmp_path / "adapter", moe_layers=layers)
    cfg = json.loads((folder / "expert_cfg.json").read_text())
    assert set(cfg["experts"]) == {str(x) for x in layers}  # every MoE layer is a key
    assert cfg["experts"][str(layers[-1])] == [2, 6]
    back = import_esft(folder, path, task="law")
    assert back.manifest.experts == {layers[-1]: [2, 6]}
    assert back.manifest.content_digest == es.manifest.content_digest
    x = torch.randint(4, 90, (1, 8))
    with torch.no_grad(), apply_expert_set(base, back):
        assert torch.equal(base(x).logits, tuned(x).logits)


def _reference_folder(tmp_path, base, extra=None, cfg=None):
    folder = tmp_path / "ref"
    folder.mkdir()
    tensors = {}
    for p, t in zip(
        ("gate_proj", "up_proj", "down_proj"),
        read_expert(base, 1, 3).map(lambda t: t + 1).items(),
        strict=True,
    ):
        tensors[f"model.layers.1.mlp.experts.3.{p}.weight"] = t[1].contiguous()
    tensors.update(extra or {})
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = cfg or {"experts": {"1": [3], "2": []}, "shared_experts": False, "non_expert_modules": False}
    (folder / "expert_cfg.json").write_text(json.dumps(cfg))
    return folder


def test_import_hand_written_reference_with_shared_experts(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    base = load_model(path)
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    shared = dict(base.named_parameters())[name].detach() * 2
    folder = _reference_folder(
        tmp_path,
        base,
        {name: shared.contiguous()},
        {"experts": {"1": [3], "2": []}, "shared_experts": True, "non_expert_modules": False},
    )
    es = import_esft(folder, path)
    assert es.manifest.provenance.method == "esft-reference"
    assert es.manifest.provenance.train_shared_experts and list(es.manifest.extra_params) == [name]
    with apply_expert_set(base, es):
        assert torch.equal(dict(base.named_parameters())[name], shared)
        assert read_expert(base, 1, 3).equal(read_expert(load_model(path), 1, 3).map(lambda t: t + 1))
    assert torch.equal(dict(base.named_parameters())[name], shared / 2)


def test_import_refuses_bad_folders(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    base = load_model(path)
    with pytest.raises(PatchFormatError, match="no expert_cfg.json"):
        import_esft(tmp_path, path)
    folder = _reference_folder(tmp_path, base, cfg={"experts": {"1": [3, 4]}})
    with pytest.raises(PatchShapeError, match="adapter lacks"):
        import_esft(folder, path)
    (folder / "expert_cfg.json").write_text("{not json")
    with pytest.raises(PatchFormatError, match="not a valid ESFT expert config"):
        import_esft(folder, path)


def test_import_against_other_base_is_caught_on_apply(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    base = load_model(path)
    es = import_esft(_reference_folder(tmp_path, base), path)
    other = load_model(tiny_model_dir("deepseek_v2", seed=2))
    with pytest.raises(BaseMismatchError):
        apply_expert_set(other, es)


# --- parity with the reference's committed artefacts (tests/fixtures/esft-reference) -----------------

FIXTURE = Path(__file__).parent / "fixtures" / "esft-reference"


@pytest.fixture(scope="module")
def intent_logs(tmp_path_factory) -> Path:
    """The reference's `intent/` folder: 26 routing logs, summary.json, expert_config.json."""
    out = tmp_path_factory.mktemp("esft-ref")
    with tarfile.open(FIXTURE / "intent-routing-logs.tar.gz") as tar:
        tar.extractall(out, filter="data")
    return out / "intent"


@pytest.fixture(scope="module")
def logs_scored(intent_logs):
    return {w: score_reference_logs(intent_logs, top_k=6, weighting=w) for w in ("paper", "reference")}


def _committed(intent_logs):
    summary = json.loads((intent_logs / "summary.json").read_text())
    cfg = json.loads((intent_logs / "expert_config.json").read_text())
    return summary, cfg


def test_reference_weighting_reproduces_committed_summary_and_config(intent_logs, logs_scored):
    summary, cfg = _committed(intent_logs)
    ref = logs_scored["reference"]
    assert (ref.sequences, ref.tokens, ref.num_experts) == (127, 8222, 64)
    assert sorted(ref.token) == list(range(1, 27))
    for name, ours in (("token_scores", ref.token), ("gate_scores", ref.gate)):
        for layer, row in summary[name].items():
            assert ours[int(layer)] == [row[str(e)] for e in range(64)], (name, layer)
    chosen = select_experts(ref.token, 0.2, eps=0.0)
    assert chosen.experts == {int(k): sorted(v) for k, v in cfg["experts"].items()}
    assert chosen.to_reference()["experts"] == {k: sorted(v) for k, v in cfg["experts"].items()}


def test_paper_weighting_differs_where_sequence_lengths_matter(intent_logs, logs_scored):
    """The paper's 1/L_j weighting, recomputed here from the raw lines, picks other experts in
    four layers of the committed config; the reference weighting matches all 26."""
    _, cfg = _committed(intent_logs)
    paper = logs_scored["paper"]
    for layer in (1, 11, 26):  # independent computation of G_i and R_i
        tok, gate = np.zeros(64), np.zeros(64)
        lines = (intent_logs / f"expert_weights_{layer}.txt").read_text().splitlines()
        for line in lines:
            a, b = line.split("\t\t")
            ids, w = np.array(a.split("\t"), dtype=int), np.array(b.split("\t"), dtype=float)
            np.add.at(tok, ids, 1 / len(ids))  # 1/(K L_j) per slot
            np.add.at(gate, ids, w * 6 / len(ids))  # g / L_j
        assert paper.token[layer] == pytest.approx((tok / len(lines)).tolist(), abs=1e-12)
        assert paper.gate[layer] == pytest.approx((gate / len(lines)).tolist(), abs=1e-12)
        assert sum(paper.token[layer]) == pytest.approx(1.0)
    by_paper = select_experts(paper.token, 0.2).experts
    differ = sorted(layer for layer, ids in by_paper.items() if ids != sorted(cfg["experts"][str(layer)]))
    assert differ == [11, 17, 22, 26]


def test_select_takes_reference_logs(intent_logs, tmp_path):
    _, cfg = _committed(intent_logs)
    out = tmp_path / "cfg.json"
    args = ["select", str(intent_logs), "--top-k", "6", "--weighting", "reference", "--out", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["experts"] == {k: sorted(v) for k, v in cfg["experts"].items()}
    r = CliRunner().invoke(cli, ["select", str(intent_logs), "--out", str(out)])
    assert r.exit_code == 2 and "--top-k" in r.output


def test_reference_log_reader_refuses_bad_logs(tmp_path):
    with pytest.raises(SelectionError, match="no expert_weights"):
        score_reference_logs(tmp_path, top_k=2)
    rank = tmp_path / "rank_0"
    rank.mkdir()
    (rank / "expert_weights_1.txt").write_text("0\t1\t2\t\t0.5\t0.3\t0.2\n")
    with pytest.raises(SelectionError, match="not whole tokens of top-2"):
        score_reference_logs(tmp_path, top_k=2)
    (rank / "expert_weights_1.txt").write_text("0\t1\t1\t2\t\t0.5\t0.3\t0.6\t0.2\n")
    (rank / "expert_weights_2.txt").write_text("0\t1\t\t0.5\t0.5\n")
    with pytest.raises(SelectionError, match="different sequences or tokens"):
        score_reference_logs(tmp_path, top_k=2)
    (rank / "expert_weights_2.txt").write_text("3\t1\t1\t0\t\t0.5\t0.5\t0.9\t0.1\n")
    s = score_reference_logs(tmp_path, top_k=2, weighting="paper")  # rank_* folders are read
    assert s.num_experts == 4 and s.token[1] == [0.25, 0.5, 0.25, 0.0] and s.gate[2][3] == 0.25


def test_reference_training_sample_loads_unchanged(tmp_path):
    """The reference's training data (chat messages plus its own extra fields) goes through our
    data reader as it is."""
    samples = load_samples(FIXTURE / "intent-train-sample.jsonl", make_tokenizer())
    assert len(samples) == 100
    assert all(s.num_answer_tokens > 0 and s.num_answer_tokens < len(s) for s in samples)


def test_score_and_train_take_reference_weighting(tiny_model_dir, tmp_path):
    base, data = tiny_model_dir("deepseek_v2"), FIXTURE / "intent-train-sample.jsonl"

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    r = run("score", base, data, "--out", tmp_path / "s.json", "--budget", 1500, "--weighting", "reference")
    assert r.exit_code == 0, r.output
    scores = ExpertScores.load(tmp_path / "s.json")
    assert scores.weighting == "reference" and scores.tokens_scored == 1500
    assert all(round(x, 4) == x for row in scores.token.values() for x in row)
    r = run("select", tmp_path / "s.json", "--weighting", "paper", "--out", tmp_path / "c.json")
    assert r.exit_code == 2 and "scored with reference weighting" in r.output
    out = tmp_path / "t.safetensors"
    args = ["--budget", 1500, "--weighting", "reference", "--schedule", "constant", "--steps", 1]
    r = run("train", base, data, "--task", "intent", "--out", out, *args)
    assert r.exit_code == 0, r.output
    prov = ExpertSet.open(out).manifest.provenance
    assert prov.extra["weighting"] == "reference"
    assert prov.extra["scores"] == {str(k): v for k, v in scores.token.items()}
