"""Memory plan: exact parameter arithmetic, and the whole plan against peaks measured on CPU."""

from __future__ import annotations

import pytest
import torch

from expertlib.errors import DeviceError
from expertlib.esft.memory_plan import PeakTracker, plan_training
from expertlib.esft.selection import ExpertConfig
from expertlib.esft.training import TRAIN_SET_ROW, prepare_trainable
from expertlib.moe import describe, moe_layer_indices
from expertlib.shape import ModelShape
from expertlib.slots import active_sets, remove_slots
from expertlib.testing import make_tiny_model, tiny_config


def test_tracker_counts_live_storages_once():
    x = torch.randn(256, 256)
    with PeakTracker() as tr:
        y = x @ x  # 256 KiB
        v = y.view(-1)  # same storage: not counted again
        z = y @ x
        del y, v
        w = z * 2
    assert tr.peak == 2 * 256 * 256 * 4
    assert tr.current == 2 * 256 * 256 * 4
    del z, w
    assert tr.current == 0


def test_parameter_parts_are_exact():
    cfg = tiny_config("qwen2_moe")
    model = make_tiny_model("qwen2_moe")
    spec = describe(model)
    plan = plan_training(cfg, trained_experts=5, batch_size=2, seq_len=16, dtype="bfloat16")
    assert plan.base == spec.total_params * 2
    assert plan.trained_params == 5 * spec.params_per_expert
    assert plan.trained == plan.gradients == 5 * spec.params_per_expert * 4  # fp32 master weights
    assert plan.optimizer == 2 * plan.trained
    half = plan_training(cfg, trained_experts=5, batch_size=2, seq_len=16, master_dtype="bfloat16")
    assert half.trained == plan.trained // 2
    shape = ModelShape.from_config(cfg)
    assert (shape.hidden, shape.num_experts, shape.top_k) == (64, 8, 2)
    assert shape.shared_inter == 64


def measured_step_peak(model_type: str, batch: int, seq_len: int, dtype: str) -> tuple[int, int]:
    """(peak bytes of two training steps beyond the base weights, AdamW state bytes) on CPU."""
    model = make_tiny_model(model_type)
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    sel = ExpertConfig(experts={layer: [0, 1] for layer in moe_layer_indices(model)})
    ids = torch.randint(4, 90, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with PeakTracker() as tr:
        trainable = prepare_trainable(model, sel)
        params = [p for _, p in trainable.parameters(model)]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        with active_sets(model, TRAIN_SET_ROW):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    logits = model(input_ids=ids).logits
                flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
                torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt_bytes = sum(
            v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step"
        )
    remove_slots(model)
    return tr.peak, opt_bytes


@pytest.mark.parametrize(
    "model_type,batch,seq_len,dtype",
    [("qwen2_moe", 8, 128, "float32"), ("deepseek_v2", 4, 128, "float32"), ("olmoe", 8, 96, "bfloat16")],
)
def test_plan_matches_measured_peak(model_type, batch, seq_len, dtype):
    peak, opt_bytes = measured_step_peak(model_type, batch, seq_len, dtype)
    model = make_tiny_model(model_type)
    n = 2 * len(moe_layer_indices(model))
    plan = plan_training(model.config, trained_experts=n, batch_size=batch, seq_len=seq_len, dtype=dtype)
    assert plan.optimizer == opt_bytes
    planned = plan.total - plan.base  # the tracker sees what the step allocates, not the loaded base
    # activations dominate here (> 85% of the step), so a missing or doubled term fails this
    assert plan.activations > 0.85 * planned
    assert 0.85 * peak <= planned <= 1.35 * peak, (planned, peak)


def test_refuses_what_does_not_fit_with_suggestions():
    cfg = tiny_config("qwen2_moe", num_hidden_layers=8)
    plan = plan_training(cfg, trained_experts=4, batch_size=64, seq_len=1024)
    plan.check(plan.total * 2, device="cpu")
    with pytest.raises(DeviceError) as err:
        plan.check(plan.total // 2, device="cuda:0")
    msg = str(err.value)
    assert "cuda:0" in msg and "activations" in msg
    assert "--dtype bfloat16" in msg and "--gradient-checkpointing" in msg and "--batch-size" in msg
    recompute = plan_training(
        cfg, trained_experts=4, batch_size=64, seq_len=1024, gradient_checkpointing=True
    )
    assert recompute.activations < 0.5 * plan.activations
