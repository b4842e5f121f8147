"""The logic the CUDA serving path shares with CPU (docs/GPU.md), checked on CPU.

A captured CUDA graph replays fixed kernels on fixed addresses: the per-token set buffer and the remap
table must be updated in place (same storage) and the remap must have no host sync or Python branch
on data. The layout and model-runner guards must refuse the vLLM configurations where a set would be
silently dropped or scrambled (FlashInfer MoE kernels, vLLM's V2 model runner).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from expertlib.vllm_plugin.routing import SlotContext

pytest.importorskip("vllm")


def _ctx(**kw) -> SlotContext:
    args = dict(num_layers=2, num_experts=8, slots=4, max_sets=3, max_tokens=32, device="cpu")
    return SlotContext(**{**args, **kw})


def _device_like(ctx: SlotContext) -> SlotContext:
    """Give `ctx` a token buffer separate from its host staging buffer, as on CUDA (the CPU
    SlotContext reads the host buffer directly), so set_tokens takes the device branch."""
    ctx.token_offsets = ctx._host.clone()  # a copy of the zeroed staging buffer, as on CUDA
    return ctx


@pytest.mark.parametrize("device_like", [False, True], ids=["cpu-buffer", "device-buffer"])
def test_token_buffer_is_updated_in_place(device_like):
    """A view taken before a step (what a captured graph holds) sees every later step's set rows."""
    ctx = _ctx()
    if device_like:
        _device_like(ctx)
    ptr = ctx.token_offsets.data_ptr()
    captured = ctx.token_offsets[:6]  # the slice a graph of 6 tokens reads
    ctx.set_tokens([2, 0, 1], [2, 1, 3])
    assert ctx.token_offsets.data_ptr() == ptr
    assert captured.tolist() == [16, 16, 0, 8, 8, 8]  # row * num_experts
    ctx.set_tokens([3], [2])  # shorter step: the tail goes back to the base row
    assert ctx.token_offsets.data_ptr() == ptr
    assert captured.tolist() == [24, 24, 0, 0, 0, 0]
    ctx.clear_tokens()
    assert captured.tolist() == [0] * 6


def test_unchanged_steps_copy_nothing_to_the_device():
    """The per-step host-to-device copy happens only when the step's offsets differ from what the
    device buffer holds: base-only steps after base-only steps, and a decode step of the same batch,
    copy nothing; every step that changes something still lands on the device."""
    ctx = _device_like(_ctx())
    for _ in range(3):
        ctx.set_tokens([0, 0], [4, 3])  # base-only
    assert ctx.copies == 0
    ctx.set_tokens([2, 0], [1, 1])
    ctx.set_tokens([2, 0], [1, 1])  # the same batch decoding again
    assert ctx.copies == 1 and ctx.token_offsets[:3].tolist() == [16, 0, 0]
    ctx.set_tokens([0, 2], [1, 1])  # same size, other layout
    assert ctx.copies == 2 and ctx.token_offsets[:3].tolist() == [0, 16, 0]
    ctx.set_tokens([0], [5])  # back to the base: the stale row must go
    assert ctx.copies == 3 and ctx.token_offsets[:5].tolist() == [0] * 5
    ctx.set_tokens([0], [9])
    ctx.clear_tokens()
    assert ctx.copies == 3


def test_dummy_runs_leave_the_set_buffer_alone():
    """vLLM's _dummy_run (warm-up, profiling, graph capture; num_reqs=0) runs outside the input-prep
    synchronisation that protects the pinned staging buffer: it must neither write nor copy it."""
    from expertlib.vllm_plugin.batch import fill_token_sets

    ctx = _device_like(_ctx())
    ctx.set_tokens([1, 3], [2, 2])
    copies, before = ctx.copies, ctx._host.clone()
    fill_token_sets(SimpleNamespace(), ctx, 0)  # the runner is not even read
    assert ctx.copies == copies and torch.equal(ctx._host, before)
    assert ctx.token_offsets[:4].tolist() == [8, 8, 24, 24]


def test_remap_table_rows_are_written_in_place():
    """Loading a set (expertlib_set_row) copies into the remap table the graph captured."""
    from expertlib.vllm_plugin.worker import SlotWorkerExtension

    ctx = _ctx()
    worker = SlotWorkerExtension()
    worker._expertlib_ctx = lambda: ctx
    ptr = ctx.remap.data_ptr()
    layer_view = ctx.remap[1]  # what a graph's take() on layer 1 reads
    ids = torch.tensor([[5, 1], [5, 1]], dtype=torch.int32)
    ctx.set_tokens([0, 2], [1, 1])
    before = ctx.remap_ids(1, ids)
    worker.expertlib_set_row(2, {1: {5: 1}})  # layer 1: expert 5 -> slot 1
    assert ctx.remap.data_ptr() == ptr
    phys = int(layer_view[2, 5])
    assert phys != 5 and layer_view[2, :5].tolist() == [0, 1, 2, 3, 4]
    after = ctx.remap_ids(1, ids)
    assert before.tolist() == [[5, 1], [5, 1]]
    assert after.tolist() == [[5, 1], [phys, 1]]  # only the token of row 2 moves
    worker.expertlib_clear_row(2)
    assert ctx.remap.data_ptr() == ptr and ctx.remap_ids(1, ids).tolist() == [[5, 1], [5, 1]]


def test_remap_traces_as_one_graph():
    """No host sync, no Python branch on values: dynamo captures remap_ids whole (fullgraph) and
    the traced function follows later updates of the buffers, as a replayed CUDA graph must."""
    ctx = _device_like(_ctx())
    ids = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int32)
    fn = torch.compile(lambda x: ctx.remap_ids(0, x), fullgraph=True, backend="eager", dynamic=False)
    ctx.set_tokens([0], [3])
    assert torch.equal(fn(ids), ids)  # traced on a base-only step, like vLLM's warm-up
    ctx.remap[0, 1, 3] = 11
    ctx.set_tokens([0, 1, 0], [1, 1, 1])
    assert fn(ids).tolist() == [[1, 2], [11, 4], [5, 6]]


def _experts(impl, n=3, i=4, h=8):
    """A stand-in MoE layer (`runner.routed_experts`) whose kernel implementation is `impl`."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    method = object.__new__(UnquantizedFusedMoEMethod)  # no vLLM config needed: only its type is read
    method.moe_kernel = SimpleNamespace(fused_experts=impl)
    return SimpleNamespace(
        quant_method=method, w13_weight=torch.zeros(n, 2 * i, h), w2_weight=torch.zeros(n, h, i)
    )


def test_triton_kernel_takes_checkpoint_layout():
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from expertlib.vllm_plugin.worker import runtime_layout

    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    out13, out2 = runtime_layout(_experts(object.__new__(TritonExperts)), w13, w2)
    assert out13 is w13 and out2 is w2


def test_other_gpu_kernels_are_refused_even_with_matching_shapes():
    """FlashInfer's kernels keep the parameter shapes but swap or block-permute the rows (and the
    monolithic one routes inside the kernel): raw checkpoint rows there would serve garbage."""
    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.worker import runtime_layout

    class FlashInferLikeExperts:  # same shapes, other layout
        pass

    experts = _experts(FlashInferLikeExperts())
    with pytest.raises(EngineError, match="FlashInferLikeExperts") as err:
        runtime_layout(experts, torch.randn(2, 8, 8), torch.randn(2, 8, 4))
    assert "moe_backend='triton'" in err.value.hint


def test_model_runner_without_the_set_hook_is_refused():
    """vLLM's V2 model runner never calls `_init_model_kwargs`: every request would get the base."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.batch import install_set_id_hook
    from expertlib.vllm_plugin.worker import check_set_hook

    install_set_id_hook()
    check_set_hook(object.__new__(GPUModelRunner))
    check_set_hook(object.__new__(CPUModelRunner))

    class V2LikeRunner:
        def execute_model(self, scheduler_output):
            return None

    with pytest.raises(EngineError, match="V2LikeRunner") as err:
        check_set_hook(V2LikeRunner())
    assert "VLLM_USE_V2_MODEL_RUNNER=0" in err.value.hint


def test_slot_engines_keep_vllms_v1_model_runner(monkeypatch):
    from expertlib.vllm_plugin import slot_hf_overrides

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "")  # records the session's value for the undo
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    slot_hf_overrides("qwen3_moe", slots=4, max_sets=2)
    import os

    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")  # a user's explicit choice stays
    slot_hf_overrides("qwen3_moe", slots=4, max_sets=2)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def _layers(**par):
    cfg = dict(dp_size=1, pcp_size=1, sp_size=1, tp_size=2, use_ep=False)
    runner = SimpleNamespace(
        moe_config=SimpleNamespace(moe_parallel_config=SimpleNamespace(**{**cfg, **par}))
    )
    return SimpleNamespace(layers={0: runner, 1: runner})


@pytest.mark.parametrize("par", [{"dp_size": 2}, {"pcp_size": 2}, {"sp_size": 2}])
def test_layouts_that_gather_other_ranks_tokens_are_refused(par):
    """Data/context/sequence-parallel MoE routes tokens of several ranks at once: the per-token set
    buffer (this rank's step, in batch order) would be read against the wrong tokens."""
    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.worker import check_token_layout

    check_token_layout(_layers())  # tensor parallelism alone is fine (tests/test_vllm_tp.py)
    with pytest.raises(EngineError, match="parallel MoE") as err:
        check_token_layout(_layers(**par))
    assert "tensor parallelism" in err.value.hint


def test_micro_batching_is_refused():
    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.worker import check_token_layout

    check_token_layout(_layers(), SimpleNamespace(use_ubatching=False))
    with pytest.raises(EngineError, match="micro-batching"):
        check_token_layout(_layers(), SimpleNamespace(use_ubatching=True))


def test_slot_engines_ask_vllm_for_the_triton_moe_kernel_on_gpus(monkeypatch):
    """On CUDA vLLM would pick FlashInfer on Blackwell; slot engines ask for Triton unless told."""
    from expertlib import engine

    base = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_moe"), path="/base")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert "moe_backend" not in engine._engine_kwargs(base, 4, 2, {})  # CPU: vLLM's CPU kernel
    monkeypatch.setattr(engine, "_on_cpu", lambda: False)
    assert engine._engine_kwargs(base, 4, 2, {})["moe_backend"] == "triton"
    assert (
        engine._engine_kwargs(base, 4, 2, {"moe_backend": "batched_triton"})["moe_backend"]
        == "batched_triton"
    )
