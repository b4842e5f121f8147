"""The vLLM slot router's remap (SlotContext), checked against a plain per-token lookup."""

from __future__ import annotations

import pytest
import torch

from expertlib.vllm_plugin.routing import SlotContext


def _ctx(**kw) -> SlotContext:
    args = dict(num_layers=3, num_experts=8, slots=4, max_sets=3, max_tokens=64, device="cpu")
    return SlotContext(**{**args, **kw})


def test_remap_follows_each_tokens_set_row():
    ctx = _ctx()
    ctx.remap[1, 2, 5] = 9  # layer 1: set row 2 maps expert 5 to slot 9
    ctx.remap[1, 3, 5] = 10
    ctx.remap[2, 2, 0] = 8
    rows, counts = [0, 2, 3, 2], [3, 1, 2, 1]
    ctx.set_tokens(rows, counts)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (7, 4), generator=g, dtype=torch.int32)
    ids[:, 0] = 5
    ids[3, 1] = 0
    token_rows = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts))
    for layer in range(3):
        got = ctx.remap_ids(layer, ids)
        want = torch.stack([ctx.remap[layer, r][i.long()] for r, i in zip(token_rows, ids, strict=True)])
        assert got.dtype == ids.dtype and got.shape == ids.shape
        assert torch.equal(got, want.to(ids.dtype))
    assert ctx.remap_ids(1, ids)[3, 0] == 9 and ctx.remap_ids(1, ids)[4, 0] == 10
    assert ctx.remap_ids(2, ids)[3, 1] == 8
    assert torch.equal(ctx.remap_ids(0, ids), ids)  # layer 0 has no remapped experts


def test_shorter_and_base_only_steps_clear_stale_rows():
    ctx = _ctx()
    ctx.remap[0, 1] = torch.arange(8, 16)  # row 1 sends every expert of layer 0 to slots
    ctx.set_tokens([1, 1], [5, 5])
    ids = torch.zeros(10, 2, dtype=torch.int64)
    assert ctx.remap_ids(0, ids).eq(8).all()
    ctx.set_tokens([1, 0], [2, 3])  # a shorter step: tokens 5..9 must not keep row 1
    assert ctx.remap_ids(0, ids)[:2].eq(8).all() and ctx.remap_ids(0, ids)[2:].eq(0).all()
    ctx.set_tokens([1], [4])
    ctx.set_tokens([0, 0], [4, 4])  # base-only step
    assert ctx.remap_ids(0, ids).eq(0).all()
    ctx.set_tokens([1], [3])
    ctx.clear_tokens()  # warm-up / dummy runs see the base
    assert ctx.remap_ids(0, ids).eq(0).all()


def test_quantized_moe_weights_are_refused():
    """Slots cannot take a set into quantized weights (scales would be wrong): a clear error, no write."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.worker import runtime_layout

    w13, w2 = torch.ones(1, 8, 4), torch.ones(1, 4, 4)
    fake = SimpleNamespace(
        quant_method=object(), w13_weight=torch.zeros(3, 8, 4), w2_weight=torch.zeros(3, 4, 4)
    )
    with pytest.raises(EngineError, match="quantized") as err:
        runtime_layout(fake, w13, w2)
    assert "unquantized" in err.value.hint
    assert fake.w13_weight.eq(0).all()
