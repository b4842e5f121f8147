"""The demo base: pretraining lowers the loss, is deterministic, masks prompts, caches its result."""

from __future__ import annotations

import json

import pytest
import torch

from expertlib.demo import base as demo_base
from expertlib.demo.base import (
    DEMO_INFO_FILE,
    QUICK_CONFIG,
    TINY_CONFIG,
    DemoBaseConfig,
    build_demo_base,
    collate,
    demo_base_info,
    demo_base_path,
    encode,
    pretrain,
)
from expertlib.demo.tasks import Example
from expertlib.testing import make_tokenizer

TINY = TINY_CONFIG


def test_prompt_tokens_are_masked():
    tok = make_tokenizer()
    [(ids, plen)] = encode(tok, [Example("copy", "copy: abc", "abc")])
    assert tok.decode(ids[:plen]) == "<s>Q: copy: abc\nA: "
    batch = collate([(ids, plen), (ids[: plen + 1], plen)], tok.pad_token_id)
    labels = batch["labels"]
    assert (labels[0, :plen] == -100).all()
    assert labels[0, plen : len(ids)].tolist() == ids[plen:]  # the answer and </s> are trained
    assert (labels[1, plen + 1 :] == -100).all() and (batch["attention_mask"][1, plen + 1 :] == 0).all()
    assert batch["input_ids"].shape[1] % 16 == 0


def test_config_key_covers_every_setting():
    assert DemoBaseConfig().key() == DemoBaseConfig().key()
    assert DemoBaseConfig(seed=1).key() != DemoBaseConfig().key()
    assert QUICK_CONFIG.key() != DemoBaseConfig().key()
    cfg = demo_base.make_config(DemoBaseConfig())
    assert cfg.hidden_size % 32 == 0 and cfg.num_experts >= 16 and cfg.num_experts_per_tok > 1
    assert cfg.shared_expert_intermediate_size > 0


@pytest.mark.slow
def test_short_pretraining_lowers_loss_and_is_deterministic():
    model_a, stats_a = pretrain(TINY, progress=False, threads=1)
    _, stats_b = pretrain(TINY, progress=False, threads=1)
    assert stats_a["final_loss"] < stats_a["first_loss"] - 0.5, stats_a
    assert stats_a["loss_curve"] == stats_b["loss_curve"]
    assert stats_a["first_loss"] == stats_b["first_loss"]
    assert not model_a.training


@pytest.mark.slow
def test_build_caches_a_normal_pretrained_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path))
    path = build_demo_base(TINY, progress=False, threads=1)
    assert path == demo_base_path(TINY) and path.parent == tmp_path / "demo"
    info = demo_base_info(path)
    assert set(info["accuracy"]) == {"copy", "upper"} and info["key"] == TINY.key()
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == "qwen2_moe"
    assert AutoTokenizer.from_pretrained(str(path)).chat_template

    # Second call: reused, not retrained.
    stamp = (path / DEMO_INFO_FILE).stat().st_mtime_ns
    monkeypatch.setattr(demo_base, "pretrain", lambda *a, **k: pytest.fail("retrained a cached base"))
    assert build_demo_base(TINY, progress=False) == path
    assert (path / DEMO_INFO_FILE).stat().st_mtime_ns == stamp
    assert json.loads((path / DEMO_INFO_FILE).read_text())["steps"] == TINY.steps
    assert not list(tmp_path.glob("demo/.*tmp"))
    assert torch.get_num_threads() >= 1


def test_the_shipped_base_is_checked_and_installed_without_pretraining(tmp_path, monkeypatch):
    import shutil

    from expertlib.demo.base import SHIPPED_DIGEST, SHIPPED_DIR, check_shipped_base, file_digest
    from expertlib.errors import ModelLoadError

    assert check_shipped_base() == SHIPPED_DIR
    assert file_digest(SHIPPED_DIR / "model.safetensors") == SHIPPED_DIGEST
    assert (SHIPPED_DIR / "model.safetensors").stat().st_size < 12 * 2**20  # a few MB

    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_base, "pretrain", lambda *a, **k: pytest.fail("pretrained the shipped base"))
    path = build_demo_base(progress=False)
    assert (
        path == demo_base_path(DemoBaseConfig()) and file_digest(path / "model.safetensors") == SHIPPED_DIGEST
    )
    assert build_demo_base(quick=True, progress=False) == path  # quick uses the same base
    info = demo_base_info(path)
    assert info["key"] == DemoBaseConfig().key() and info["threads"] == demo_base.PRETRAIN_THREADS
    assert min(info["accuracy"].values()) >= 0.8, info["accuracy"]  # it really has the general skills

    # one flipped byte in the weights is refused, with what to do
    bad = tmp_path / "bad"
    shutil.copytree(SHIPPED_DIR, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="sha256") as err:
        check_shipped_base(bad)
    assert "--rebuild" in str(err.value)


def test_domain_prior_pulls_each_domain_towards_its_own_expert_group():
    from expertlib.demo.base import domain_groups, domain_prior_loss

    groups = domain_groups(DemoBaseConfig())
    flat = sorted(e for g in groups.values() for e in g)
    assert flat == list(range(DemoBaseConfig().num_experts))  # a partition of the routed experts
    assert set(groups) == {"words", "numbers", "patterns", "brackets"}

    # two samples of length 3 (the second padded after 2 tokens), 8 experts, groups {0-3}, {4-7}
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    group = torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4])
    uniform = [torch.zeros(6, 8)]
    assert float(domain_prior_loss(uniform, mask, group)) == pytest.approx(
        -torch.log(torch.tensor(0.5)).item()
    )
    own = torch.full((6, 8), -30.0)
    own[:3, 0] = 30.0  # sample 0 routes into its group...
    own[3:, 5] = 30.0  # ...and sample 1 into its own
    assert float(domain_prior_loss([own], mask, group)) == pytest.approx(0.0, abs=1e-6)
    swapped = own.clone()
    swapped[3:5] = own[0]  # sample 1's real tokens go to sample 0's group: penalised
    assert float(domain_prior_loss([swapped], mask, group)) > 5
    both = float(domain_prior_loss([own, swapped], mask, group))  # averaged over layers
    assert both == pytest.approx(float(domain_prior_loss([swapped], mask, group)) / 2)
    padded = own.clone()
    padded[5] = own[0]  # sample 1's padding position routes anywhere: not counted
    assert float(domain_prior_loss([padded], mask, group)) == pytest.approx(0.0, abs=1e-6)
