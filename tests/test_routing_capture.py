"""The slot router's routing capture (`model="auto"`) and its switch EXPERTLIB_ROUTING_CAPTURE=0,
which bench/auto_route.py measures the capture's cost against."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


class _Router:
    """Stands in for a vLLM router: top-k ids fixed by the test."""

    ids = torch.tensor([[0, 2], [2, 3], [1, 2]], dtype=torch.int32)

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return torch.ones(self.ids.shape), self.ids


def _route(capture: bool, monkeypatch) -> list[float]:
    from expertlib.vllm_plugin import routing

    monkeypatch.setattr(routing, "ROUTING_CAPTURE", capture)
    ctx = routing.SlotContext(num_layers=1, num_experts=4, slots=2, max_sets=1, max_tokens=8, device="cpu")
    ctx.layers[0] = None
    router = routing.slot_router_class(_Router)()
    router.expertlib_ctx, router.expertlib_layer = ctx, 0
    ctx.set_capture([1], [3])  # one request of 3 tokens, captured in row 1
    _, ids = router._compute_routing(None, None, torch.int32)
    assert ids.tolist() == _Router.ids.tolist()  # the base row: ids unchanged
    return ctx.take_routing(1)[0]


def test_capture_counts_the_top_k_picks_per_expert(monkeypatch):
    assert _route(True, monkeypatch) == [1.0, 1.0, 3.0, 1.0]


def test_capture_switched_off_counts_nothing(monkeypatch):
    assert _route(False, monkeypatch) == [0.0, 0.0, 0.0, 0.0]


def _ctx():
    from expertlib.vllm_plugin import routing

    ctx = routing.SlotContext(num_layers=1, num_experts=4, slots=2, max_sets=1, max_tokens=8, device="cpu")
    ctx.layers[0] = None
    router = routing.slot_router_class(_Router)()
    router.expertlib_ctx, router.expertlib_layer = ctx, 0
    return ctx, router


def test_a_step_without_a_captured_request_counts_nothing():
    """The capture's cost is paid only by steps that hold a `model="auto"` routing request."""
    ctx, router = _ctx()
    ctx.set_capture([0], [3])  # a base request: not captured
    assert not ctx.counting()
    router._compute_routing(None, None, torch.int32)
    assert float(ctx.routing_counts.abs().sum()) == 0.0  # not even into row 0
    ctx.set_capture([0, 1], [2, 1])  # a captured request joins the step
    assert ctx.counting()
    router._compute_routing(None, None, torch.int32)
    assert ctx.take_routing(1)[0] == [0.0, 1.0, 1.0, 0.0]  # its one token: ids (1, 2)
    ctx.set_capture([0], [3])
    assert not ctx.counting()


def test_traced_code_always_holds_the_count():
    """A graph traced at warm-up (nothing captured) is replayed for every later step: it must count."""
    ctx, _ = _ctx()
    assert not ctx.counting()

    @torch.compile(backend="eager", fullgraph=True)
    def step(x):
        return x + 1 if ctx.counting() else x

    assert step(torch.zeros(1)).item() == 1.0
