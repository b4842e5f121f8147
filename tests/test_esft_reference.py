"""ESFT reference adapter folders (expert_cfg.json + full-weight safetensors) in and out."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from expertlib.apply import apply_expert_set, extract_expert_set
from expertlib.errors import BaseMismatchError, PatchFormatError, PatchShapeError
from expertlib.esft_reference import export_esft, import_esft
from expertlib.moe import load_model, moe_layer_indices, read_expert, write_expert


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
