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
from safetensors.torch import load_file, save_file

from expertlib.apply import apply_expert_set, extract_expert_set
from expertlib.checkpoint import BaseCheckpoint
from expertlib.cli.main import cli
from expertlib.errors import BaseMismatchError, PatchFormatError, PatchShapeError, SelectionError
from expertlib.esft.data import load_samples
from expertlib.esft.reference import INFERRED, export_esft, import_esft
from expertlib.esft.reference_logs import score_reference_logs
from expertlib.esft.scoring import ExpertScores
from expertlib.esft.selection import select_experts
from expertlib.moe import load_model, moe_layer_indices, read_expert, tensor_digest, write_expert
from expertlib.patch import ExpertSet, Provenance, pair_key
from expertlib.registry import Registry
from expertlib.testing import make_tokenizer


def reference_load(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """deepseek-ai/ESFT's loader (esft.py), on checkpoint keys: `to_esft` makes exactly the listed
    experts trainable (plus every shared expert / every other tensor when flagged) and reads
    `adapter_config["experts"][str(idx)]` for every MoE layer; legacy `layers.*` keys get the
    `model.` prefix; `load_state_dict` is strict. Returns the base weights with the adapter loaded."""
    cfg = json.loads((adapter / "expert_cfg.json").read_text())
    state = {k: v for f in sorted(base_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    loaded = {k: v for f in sorted(adapter.glob("*.safetensors")) for k, v in load_file(f).items()}
    loaded = {("model." + k if k.startswith("layers") else k): v for k, v in loaded.items()}
    ckpt = BaseCheckpoint(base_dir)
    spec = ckpt.spec
    trainable = set()
    blocks = {
        layer: spec.checkpoint_key.split(".experts.")[0].format(layer=layer) for layer in ckpt.moe_layers
    }
    for key in state:
        layer = next((lay for lay, b in blocks.items() if key.startswith(b + ".")), None)
        if layer is None:
            trainable |= {key} if cfg.get("non_expert_modules") else set()
            continue
        ids = cfg["experts"][str(layer)]  # KeyError on a missing MoE layer, like to_esft
        rest = key[len(blocks[layer]) + 1 :]
        if rest.startswith("experts."):
            if int(rest.split(".")[1]) in ids:
                trainable.add(key)
        elif spec.shared_attr and rest.startswith(spec.shared_attr):
            trainable |= {key} if cfg.get("shared_experts") else set()
        elif cfg.get("non_expert_modules"):
            trainable.add(key)
    missing, unexpected = sorted(trainable - set(loaded)), sorted(set(loaded) - trainable)
    if missing or unexpected:
        raise RuntimeError(f"strict load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in loaded.items():
        if t.shape != state[k].shape:
            raise RuntimeError(f"size mismatch for {k}")
    return {**state, **loaded}


def _tuned_set(path, shared: bool = False):
    """Experts 2 and 6 of the last MoE layer retrained (x3); with `shared`, one shared-expert tensor too."""
    base = load_model(path)
    layers = moe_layer_indices(base)
    tuned = copy.deepcopy(base)
    for e in (2, 6):
        write_expert(tuned, layers[-1], e, read_expert(base, layers[-1], e).map(lambda t: t * 3))
    extra = {}
    if shared:
        name = f"model.layers.{layers[0]}.mlp.shared_experts.down_proj.weight"
        extra[name] = (dict(base.named_parameters())[name].detach() * 2).contiguous()
    es = extract_expert_set(tuned, base, task="law")
    if extra:
        es = ExpertSet.build(
            task="law",
            base=es.manifest.base,
            experts=dict(es.experts()),
            base_digests={p: es.manifest.base_expert_digests[pair_key(*p)] for p in es.manifest.pairs()},
            extra_params=extra,
            base_param_digests={k: tensor_digest(dict(base.named_parameters())[k]) for k in extra},
            provenance=Provenance(train_shared_experts=True),
        )
    return base, tuned, layers, es


@pytest.mark.parametrize("arch", ["deepseek_v2", "mixtral", "qwen2_moe"])
def test_export_loads_like_the_reference_and_imports_back(arch, tiny_model_dir, tmp_path):
    path = tiny_model_dir(arch)
    base, tuned, layers, es = _tuned_set(path)
    folder = export_esft(es, tmp_path / "adapter", path)
    cfg = json.loads((folder / "expert_cfg.json").read_text())
    assert cfg["experts"] == {str(x): ([2, 6] if x == layers[-1] else []) for x in layers}
    loaded = reference_load(path, folder)
    key = BaseCheckpoint(path).spec.checkpoint_key
    for e in range(8):
        for proj, part in zip(BaseCheckpoint(path).spec.proj_names, ("gate", "up", "down"), strict=True):
            k = key.format(layer=layers[-1], expert=e, proj=proj)
            want = (
                getattr(es.expert(layers[-1], e), part)
                if e in (2, 6)
                else load_file(path / "model.safetensors")[k]
            )
            assert torch.equal(loaded[k], want)
    back = import_esft(folder, path, task="law")
    assert back.manifest.experts == {layers[-1]: [2, 6]}
    assert back.manifest.content_digest == es.manifest.content_digest  # bit-exact
    assert back.manifest.provenance.extra["expert_config"].endswith("expert_cfg.json")
    x = torch.randint(4, 90, (1, 8))
    with torch.no_grad(), apply_expert_set(base, back):
        assert torch.equal(base(x).logits, tuned(x).logits)


def test_export_fills_whole_tensor_groups_the_reference_expects(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    _, _, layers, es = _tuned_set(path, shared=True)
    folder = export_esft(es, tmp_path / "adapter", path)
    assert json.loads((folder / "expert_cfg.json").read_text())["shared_experts"] is True
    loaded = reference_load(path, folder)  # strict: every shared-expert tensor of every MoE layer
    name = f"model.layers.{layers[0]}.mlp.shared_experts.down_proj.weight"
    assert torch.equal(loaded[name], es.extra_params()[name])
    back = import_esft(folder, path, task="law")
    assert back.manifest.content_digest != es.manifest.content_digest  # the group came along...
    assert torch.equal(back.extra_params()[name], es.extra_params()[name])  # ...values unchanged
    assert set(back.extra_params()) > set(es.extra_params())
    # the loader above is a real check: a config without every MoE layer, or a partial group, fails
    cfg = json.loads((folder / "expert_cfg.json").read_text())
    del cfg["experts"][str(layers[0])]
    (folder / "expert_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError):
        reference_load(path, folder)
    save_file({name: es.extra_params()[name]}, str(folder / "model.safetensors"))  # a partial group
    cfg["experts"][str(layers[0])] = []
    (folder / "expert_cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="strict load"):
        reference_load(path, folder)


def test_export_refuses_another_base(tiny_model_dir, tmp_path):
    _, _, _, es = _tuned_set(tiny_model_dir("deepseek_v2"))
    with pytest.raises(BaseMismatchError):
        export_esft(es, tmp_path / "adapter", tiny_model_dir("deepseek_v2", seed=2))


def _rewrite(folder, out, rename=lambda k: k, keep=lambda k: True, cfg=False):
    """A copy of an adapter folder's weights with keys renamed or dropped, with or without its config."""
    out.mkdir(parents=True)
    tensors = load_file(folder / "model.safetensors")
    save_file({rename(k): t for k, t in tensors.items() if keep(k)}, str(out / "model.safetensors"))
    if cfg:
        (out / "expert_cfg.json").write_text((folder / "expert_cfg.json").read_text())
    return out


def test_import_trainer_output_legacy_keys_and_rank_folders(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    _, _, layers, es = _tuned_set(path)
    folder = export_esft(es, tmp_path / "adapter", path)
    digest = es.manifest.content_digest
    # the reference trainer saves no expert_cfg.json: inferred from the keys, or given
    trainer = _rewrite(folder, tmp_path / "last_checkpoint")
    inferred = import_esft(trainer, path, task="law")
    assert inferred.manifest.content_digest == digest
    assert inferred.manifest.provenance.extra["expert_config"] == INFERRED
    given = import_esft(trainer, path, task="law", expert_config=folder / "expert_cfg.json")
    assert given.manifest.content_digest == digest
    # legacy v1 keys `layers.*`
    legacy = _rewrite(folder, tmp_path / "legacy", rename=lambda k: k.removeprefix("model."), cfg=True)
    assert all(k.startswith("layers.") for k in load_file(legacy / "model.safetensors"))
    assert import_esft(legacy, path, task="law").manifest.content_digest == digest
    # expert-parallel training: one folder per rank, each with its own experts
    ep0 = _rewrite(folder, tmp_path / "ep0", keep=lambda k: ".experts.2." in k)
    ep1 = _rewrite(folder, tmp_path / "ep1", keep=lambda k: ".experts.6." in k)
    assert import_esft([ep0, ep1], path, task="law").manifest.content_digest == digest
    with pytest.raises(PatchShapeError, match="lacks"):  # a rank missing
        import_esft(ep0, path, task="law", expert_config=folder / "expert_cfg.json")
    with pytest.raises(PatchShapeError, match="holds the same routed expert"):
        import_esft([ep0, trainer], path, task="law")


def test_import_rank_folders_refuse_conflicting_replicas(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    _, _, layers, es = _tuned_set(path, shared=True)
    folder = export_esft(es, tmp_path / "adapter", path)
    shared = lambda k: ".shared_experts." in k  # noqa: E731
    ep0 = _rewrite(folder, tmp_path / "ep0", keep=lambda k: ".experts.2." in k or shared(k))
    ep1 = _rewrite(folder, tmp_path / "ep1", keep=lambda k: ".experts.6." in k or shared(k))
    merged = import_esft([ep0, ep1], path, task="law")  # replicated shared experts agree
    assert merged.manifest.provenance.train_shared_experts
    assert merged.manifest.content_digest == import_esft(folder, path, task="law").manifest.content_digest
    tensors = load_file(ep1 / "model.safetensors")
    name = next(k for k in tensors if shared(k))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(ep1 / "model.safetensors"))
    with pytest.raises(PatchShapeError, match="disagrees on"):
        import_esft([ep0, ep1], path, task="law")


def test_import_export_from_the_shell(tiny_model_dir, tmp_path):
    path = tiny_model_dir("deepseek_v2")
    _, _, layers, es = _tuned_set(path)
    es.save(tmp_path / "law.safetensors")
    reg = tmp_path / "reg"

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args] + ["--registry", str(reg)])

    r = run("export-esft", tmp_path / "law.safetensors", tmp_path / "adapter", "--base", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["num_experts"] == 2
    folder = tmp_path / "adapter"
    reference_load(path, folder)
    trainer = _rewrite(folder, tmp_path / "last_checkpoint")
    r = run("import-esft", trainer, "--base", path, "--task", "law")
    assert r.exit_code == 0, r.output
    assert "inferred it from the tensor names" in r.output and "law@1" in r.output
    legacy = _rewrite(folder, tmp_path / "legacy", rename=lambda k: k.removeprefix("model."))
    r = run(
        "import-esft", legacy, "--base", path, "--task", "law", "--expert-config", folder / "expert_cfg.json"
    )
    assert r.exit_code == 0, r.output
    ep0 = _rewrite(folder, tmp_path / "ep0", keep=lambda k: ".experts.2." in k)
    ep1 = _rewrite(folder, tmp_path / "ep1", keep=lambda k: ".experts.6." in k)
    r = run("import-esft", ep0, ep1, "--base", path, "--task", "law", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["expert_config_inferred"] is True
    versions = [e.version for e in Registry(reg).list(name="law")]
    assert versions == [1, 2, 3]  # trainer folder, legacy keys, two ranks: the same tensors each time
    for v in versions:
        assert Registry(reg).open(f"law@{v}").manifest.content_digest == es.manifest.content_digest
    r = run("export-esft", "law", tmp_path / "again", "--base", path)
    assert r.exit_code == 0, r.output
    assert (
        load_file(tmp_path / "again" / "model.safetensors").keys()
        == load_file(folder / "model.safetensors").keys()
    )
    r = run("import-esft", ep0, ep0, "--base", path, "--task", "law")
    assert r.exit_code == 2 and "hint:" in r.output


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
    with pytest.raises(PatchFormatError, match="no safetensors weights"):
        import_esft(tmp_path, path)
    folder = _reference_folder(tmp_path, base, cfg={"experts": {"1": [3, 4]}})
    with pytest.raises(PatchShapeError, match="adapter lacks"):
        import_esft(folder, path)
    (folder / "expert_cfg.json").write_text(json.dumps({"experts": {"1": []}}))
    with pytest.raises(PatchShapeError, match="does not list"):
        import_esft(folder, path)
    (folder / "expert_cfg.json").write_text("{not json")
    with pytest.raises(PatchFormatError, match="not a valid ESFT expert config"):
        import_esft(folder, path)
    (folder / "expert_cfg.json").unlink()
    save_file({"model.norm.weight": torch.ones(4)}, str(folder / "model.safetensors"))
    with pytest.raises(PatchFormatError, match="no routed expert tensors"):
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
        # the "data" filter (no links out, no devices) exists from Python 3.11.4 (Debian 12 has 3.11.2)
        tar.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
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
