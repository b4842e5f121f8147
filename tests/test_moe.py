"""MoE model access: structure, bit-exact canonical read/write over every architecture's layout."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from expertlib.checkpoint import BaseCheckpoint
from expertlib.cli.main import cli
from expertlib.errors import PatchShapeError, UnsupportedArchitectureError
from expertlib.identity import base_identity
from expertlib.moe import (
    describe,
    load_model,
    moe_layer_indices,
    read_expert,
    write_expert,
)


def test_describe_every_arch(arch, tiny_model_dir):
    model = load_model(tiny_model_dir(arch))
    spec = describe(model)
    assert spec.model_type == arch
    assert spec.num_experts == 8 and spec.top_k == 2
    if arch.startswith("deepseek"):
        assert spec.moe_layers == (1, 2)  # first_k_dense_replace=1: layer 0 is dense
        assert spec.num_shared_experts == 1
    else:
        assert spec.moe_layers == (0, 1)
    assert spec.has_bias == (arch == "gpt_oss")
    w = read_expert(model, spec.moe_layers[0], 0)
    assert spec.params_per_expert == sum(t.numel() for _, t in w.items())
    assert spec.routed_expert_params < spec.total_params


def test_read_write_roundtrip_bit_exact(arch, tiny_model_dir):
    model = load_model(tiny_model_dir(arch))
    layer = moe_layer_indices(model)[-1]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    others = {e: read_expert(model, layer, e) for e in range(8) if e != 3}
    w = read_expert(model, layer, 3)
    new = w.map(lambda t: torch.randn_like(t))
    write_expert(model, layer, 3, new)
    assert read_expert(model, layer, 3).equal(new)
    assert all(read_expert(model, layer, e).equal(o) for e, o in others.items())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert all(f"layers.{layer}.mlp.experts." in n for n in changed) and changed
    write_expert(model, layer, 3, w)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_canonical_form_matches_checkpoint_keys(arch, tiny_model_dir):
    """read_expert on the loaded model equals the per-expert tensors on disk (the un-fused layout)."""
    path = tiny_model_dir(arch)
    model = load_model(path)
    ckpt = BaseCheckpoint(path)
    for layer in moe_layer_indices(model):
        for e in (0, 7):
            assert read_expert(model, layer, e).equal(ckpt.expert(layer, e))
    assert ckpt.identity.same_base(base_identity(model))


def test_save_reload_keeps_written_expert(tmp_path, tiny_model_dir):
    model = load_model(tiny_model_dir("mixtral"))
    new = read_expert(model, 1, 2).map(lambda t: t * -1.5)
    write_expert(model, 1, 2, new)
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert read_expert(again, 1, 2).equal(new)


def test_bad_indices_and_shapes(tiny_model_dir):
    model = load_model(tiny_model_dir("qwen2_moe"))
    with pytest.raises(PatchShapeError, match="expert 8 out of range"):
        read_expert(model, 0, 8)
    with pytest.raises(PatchShapeError, match="layer 9 out of range"):
        read_expert(model, 9, 0)
    w = read_expert(model, 0, 0)
    bad = w.map(lambda t: t[..., :-1])
    with pytest.raises(PatchShapeError, match="shape"):
        write_expert(model, 0, 0, bad)


def test_deepseek_dense_layer_is_not_moe(tiny_model_dir):
    model = load_model(tiny_model_dir("deepseek_v2"))
    with pytest.raises(PatchShapeError, match="not a Mixture-of-Experts layer"):
        read_expert(model, 0, 0)


def test_unsupported_architecture_names_supported(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(tmp_path / "llama")
    assert "qwen2_moe" in str(info.value) and "llama" in str(info.value)


def test_identity_ignores_dtype_but_not_structure(tiny_model_dir):
    model = load_model(tiny_model_dir("qwen3_moe"))
    a = base_identity(model)
    model.config.dtype = "bfloat16"
    assert base_identity(model).config_digest == a.config_digest
    model.config.num_experts_per_tok = 4
    assert base_identity(model).config_digest != a.config_digest


def test_inspect_cli_table_and_json(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{") :])
    assert data["model_type"] == arch and data["num_experts"] == 8
    assert data["identity"]["config_digest"].startswith("sha256:")
    res = runner.invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 0 and "num_experts" in res.output


def test_inspect_cli_bad_path_is_friendly(tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "hint:" in res.output and "Traceback" not in res.output
