"""ESFT training: only selected experts change, loss falls, resume is exact, every architecture trains."""

from __future__ import annotations

import json

import pytest
import torch

from expertlib.apply import apply_expert_set, changed_experts
from expertlib.errors import DataError, SelectionError
from expertlib.esft.data import load_samples, split_holdout
from expertlib.esft.selection import ExpertConfig
from expertlib.esft.training import TrainConfig, evaluate, routed_expert_param_names, train_experts
from expertlib.identity import base_identity
from expertlib.moe import describe, moe_layer_indices, read_expert
from expertlib.testing import make_tiny_model, make_tokenizer

WORDS = ["abc", "xyz", "hello", "qq", "mno", "zebra", "cat", "dog"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """A learnable toy task: repeat the word twice."""
    p = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    rows = [{"prompt": f"twice {w}", "completion": w + w} for w in WORDS * 3]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_samples(p, make_tokenizer())


def selection_for(model, ids=(0, 3)) -> ExpertConfig:
    return ExpertConfig(experts={layer: list(ids) for layer in moe_layer_indices(model)})


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "steps": 4, "batch_size": 4, **kw})


def test_only_selected_experts_change(samples):
    model = make_tiny_model("qwen2_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = ExpertConfig(experts={0: [1, 5], 1: [2]})
    res = train_experts(model, samples, sel, fast(), pad_id=0, progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys()  # slots removed again
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is bit-identical
    assert all(p.requires_grad for p in model.parameters())  # flags restored (from_config: all True)
    assert res.trainable_params == 3 * describe(model).params_per_expert
    es = res.expert_set(task="toy", base=base_identity(model))
    fresh = make_tiny_model("qwen2_moe")
    apply_expert_set(fresh, es)
    assert changed_experts(model, fresh) == {0: [1, 5], 1: [2]}
    named = dict(fresh.named_parameters())
    routed = routed_expert_param_names(fresh)
    assert all(torch.equal(named[n], before[n]) for n in named if n not in routed)


@pytest.mark.slow
def test_loss_falls_on_a_learnable_task(samples):
    model = make_tiny_model("qwen2_moe")
    train, held = split_holdout(samples, 0.25, seed=0)
    cfg = fast(steps=30, lr=1e-2, warmup_steps=3, eval_every=10)
    base_eval = evaluate(model, held, pad_id=0, config=cfg)
    res = train_experts(
        model, train, selection_for(model, range(8)), cfg, pad_id=0, eval_samples=held, progress=False
    )
    assert [s for s, _ in res.eval_losses] == [10, 20, 30]
    assert sum(res.train_losses[-5:]) / 5 < 0.85 * sum(res.train_losses[:3]) / 3
    assert res.final_eval_loss < 0.9 * base_eval
    assert evaluate(model, held, pad_id=0, config=cfg) == pytest.approx(base_eval)  # base untouched


def test_resume_equals_an_uninterrupted_run(samples, tmp_path):
    cfg = fast(steps=6, checkpoint_every=2, warmup_steps=1)
    model = make_tiny_model("mixtral")
    full = train_experts(model, samples, selection_for(model), cfg, pad_id=0, progress=False)

    class Crash(Exception):
        pass

    def crash_at_3(step, loss):
        if step == 3:
            raise Crash

    model = make_tiny_model("mixtral")
    with pytest.raises(Crash):
        train_experts(
            model,
            samples,
            selection_for(model),
            cfg,
            pad_id=0,
            checkpoint_dir=tmp_path / "ck",
            on_step=crash_at_3,
        )
    model = make_tiny_model("mixtral")  # a fresh process would start from the base again
    resumed = train_experts(
        model, samples, selection_for(model), cfg, pad_id=0, checkpoint_dir=tmp_path / "ck", resume=True
    )
    assert resumed.steps == full.steps == 6
    assert resumed.train_losses == full.train_losses
    for key, w in full.experts.items():
        assert w.equal(resumed.experts[key]), key
    with pytest.raises(DataError, match=r"another run \(differs in \['config.lr'\]\)"):
        train_experts(
            make_tiny_model("mixtral"),
            samples,
            selection_for(model),
            fast(steps=6, checkpoint_every=2, warmup_steps=1, lr=1e-3),
            pad_id=0,
            checkpoint_dir=tmp_path / "ck",
            resume=True,
        )


def test_grad_accumulation_matches_one_big_batch(samples):
    model = make_tiny_model("qwen3_moe")
    a = train_experts(
        model, samples, selection_for(model), fast(steps=2, batch_size=4), pad_id=0, progress=False
    )
    b = train_experts(
        model,
        samples,
        selection_for(model),
        fast(steps=2, batch_size=2, grad_accum=2),
        pad_id=0,
        progress=False,
    )
    assert b.train_losses == pytest.approx(a.train_losses, rel=1e-5)
    for key, w in a.experts.items():
        assert torch.allclose(w.gate, b.experts[key].gate, atol=1e-6)


def test_bf16_autocast_trains(samples):
    model = make_tiny_model("olmoe")
    res = train_experts(
        model, samples, selection_for(model), fast(steps=2, dtype="bfloat16"), pad_id=0, progress=False
    )
    assert all(torch.isfinite(torch.tensor(res.train_losses)))
    assert next(iter(res.experts.values())).gate.dtype == torch.float32  # fp32 master weights


def test_ablations_carry_extra_params(samples):
    model = make_tiny_model("deepseek_v2")
    sel = ExpertConfig(experts={1: [0], 2: [4]}, shared_experts=True)
    res = train_experts(model, samples, sel, fast(steps=2), pad_id=0, progress=False)
    assert res.extra_params and all(".shared_experts." in n for n in res.extra_params)
    es = res.expert_set(task="t", base=base_identity(model))
    assert set(es.manifest.extra_params) == set(res.extra_params) == set(es.manifest.base_param_digests)
    fresh = make_tiny_model("deepseek_v2")
    apply_expert_set(fresh, es)
    assert changed_experts(make_tiny_model("deepseek_v2"), fresh) == {1: [0], 2: [4]}

    model = make_tiny_model("qwen3_moe")
    with pytest.raises(SelectionError, match="no shared experts"):
        train_experts(model, samples, ExpertConfig(experts={0: [0]}, shared_experts=True), fast(), pad_id=0)
    res = train_experts(
        model, samples, ExpertConfig(experts={0: [0]}, non_expert_modules=True), fast(steps=1), pad_id=0
    )
    assert "model.embed_tokens.weight" in res.extra_params and "lm_head.weight" in res.extra_params
    assert not any("experts" in n for n in res.extra_params)


def test_every_architecture_trains(arch, samples):
    model = make_tiny_model(arch)
    base = make_tiny_model(arch)
    sel = selection_for(model, (2,))
    res = train_experts(model, samples, sel, fast(steps=2), pad_id=0, progress=False)
    assert all(torch.isfinite(torch.tensor(res.train_losses)))
    es = res.expert_set(task="t", base=base_identity(model))
    apply_expert_set(base, es)
    assert changed_experts(model, base) == sel.experts
    layer = moe_layer_indices(model)[0]
    assert not read_expert(base, layer, 2).equal(read_expert(model, layer, 2))


def test_lr_schedule():
    c = TrainConfig(lr=1.0, steps=10, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [c.lr_at(0), c.lr_at(1)] == [0.5, 1.0]
    assert c.lr_at(2) == pytest.approx(1.0) and c.lr_at(10) == pytest.approx(0.1)
    assert c.lr_at(6) == pytest.approx(0.55)
    lin = TrainConfig(lr=1.0, steps=4, schedule="linear")
    assert [lin.lr_at(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert TrainConfig(lr=2.0, schedule="constant").lr_at(400) == 2.0


def test_bf16_base_trains_fp32_master_weights(samples, tmp_path):
    from expertlib.patch import ExpertSet
    from expertlib.slots import slot_parameters

    model = make_tiny_model("qwen2_moe").to(torch.bfloat16)
    seen = []
    cfg = fast(dtype="bfloat16", master_dtype="float32")
    res = train_experts(
        model,
        samples,
        selection_for(model),
        cfg,
        pad_id=0,
        progress=False,
        on_step=lambda step, loss: seen.append({p.dtype for p in slot_parameters(model)}),
    )
    assert seen and all(s == {torch.float32} for s in seen)  # slots (and AdamW state) in fp32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the base stays bf16
    w = next(iter(res.experts.values()))
    assert w.gate.dtype == torch.float32
    # the patch stores the base's dtype, with digests of what it stores (a bf16 checkpoint's case)
    es = res.expert_set(task="toy", base=base_identity(model), dtype=torch.bfloat16)
    es.save(tmp_path / "p.safetensors")
    ExpertSet.open(tmp_path / "p.safetensors").verify()
    with pytest.raises(ValueError, match="master_dtype bfloat16 needs dtype bfloat16"):
        TrainConfig(dtype="float32", master_dtype="bfloat16")


def test_gradient_checkpointing_trains_the_same_experts(samples):
    runs = []
    for recompute in (False, True):
        model = make_tiny_model("olmoe")
        res = train_experts(
            model,
            samples,
            selection_for(model),
            fast(gradient_checkpointing=recompute),
            pad_id=0,
            progress=False,
        )
        assert not getattr(model, "is_gradient_checkpointing", False)  # switched off again
        runs.append(res)
    a, b = runs
    assert a.train_losses == pytest.approx(b.train_losses, rel=1e-5)
    for key, w in a.experts.items():
        assert torch.allclose(w.gate, b.experts[key].gate, atol=1e-6)


def test_default_learning_rate_follows_the_model_size(samples):
    from expertlib.esft.training import LR_ANCHORS, TrainConfig, suggest_lr

    (small, lr_small), (large, lr_large) = LR_ANCHORS
    assert suggest_lr(int(small)) == pytest.approx(lr_small) and suggest_lr(int(large)) == pytest.approx(
        lr_large
    )
    assert suggest_lr(10) == pytest.approx(lr_small) and suggest_lr(10**13) == pytest.approx(
        lr_large
    )  # clamped
    mid = [suggest_lr(n) for n in (10**7, 10**8, 10**9, 10**10)]
    assert mid == sorted(mid, reverse=True) and lr_large < mid[-1] < mid[0] < lr_small
    model = make_tiny_model("qwen2_moe")
    n = sum(p.numel() for p in model.parameters())
    assert TrainConfig().lr is None and TrainConfig().with_model(model).lr == pytest.approx(suggest_lr(n))
    assert TrainConfig(lr=1e-4).with_model(model).lr == 1e-4  # a given rate is kept
    with pytest.raises(ValueError, match="with_model"):
        TrainConfig().lr_at(0)
    # training without an lr uses the suggested one and records it in the patch's provenance
    res = train_experts(
        model, samples, selection_for(model), fast(lr=None, steps=1), pad_id=0, progress=False
    )
    es = res.expert_set(task="toy", base=base_identity(model))
    assert es.manifest.provenance.training["lr"] == pytest.approx(suggest_lr(n))
