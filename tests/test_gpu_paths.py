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


def test_slot_engines_ask_vllm_for_the_triton_moe_kernel_on_gpus(monkeypatch, tmp_path):
    """On CUDA vLLM would pick FlashInfer on Blackwell; slot engines ask for Triton unless told, and
    point vLLM at its tuned Triton config for the slot layers' E + S experts."""
    import os

    from vllm.model_executor.layers.fused_moe import fused_moe

    from expertlib.engine import memory
    from expertlib.engine import start as engine

    config = SimpleNamespace(model_type="qwen3_moe", moe_intermediate_size=768)
    base = SimpleNamespace(config=config, path="/base", num_experts=128)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    assert "moe_backend" not in engine.vllm_kwargs(base, 4, 2, {})  # CPU: vLLM's CPU kernel
    assert "VLLM_TUNED_CONFIG_FOLDER" not in os.environ  # nor tuned Triton configs
    monkeypatch.setattr(memory, "on_cpu", lambda: False)
    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H200")
    assert engine.vllm_kwargs(base, 4, 2, {})["moe_backend"] == "triton"
    assert (
        engine.vllm_kwargs(base, 4, 2, {"moe_backend": "batched_triton"})["moe_backend"] == "batched_triton"
    )
    folder = os.environ["VLLM_TUNED_CONFIG_FOLDER"]  # GPUs: vLLM finds a tuned config for E + S
    assert os.path.isfile(os.path.join(folder, "E=132,N=768,device_name=NVIDIA_H200.json"))


# --- sizing per rank, without a CUDA context in the API process ----------------------------------

GiB = 1024**3


def _dims(weights_gib: float):
    from expertlib.sizing import ServingSizes

    return ServingSizes(
        kv_bytes_per_token=1024,
        expert_bytes=3 * 4096 * 1536 * 2,
        moe_layers=94,
        num_experts=128,
        weights_bytes=int(weights_gib * GiB),
        max_position=32768,
    )


def test_gpu_fit_is_checked_per_rank_on_every_device():
    """A 440 GiB model on 8 x 80 GiB GPUs with tensor parallelism fits (55 GiB a rank); the old check
    compared the whole model with GPU 0 alone and refused every model larger than one GPU."""
    from expertlib.errors import MemoryBudgetError
    from expertlib.sizing import check_gpu_fit

    eight = [(79 * GiB, 80 * GiB)] * 8
    check_gpu_fit(_dims(440), slot_bytes=16 * GiB, devices=eight, utilization=0.9, tensor_parallel_size=8)
    check_gpu_fit(
        _dims(440),
        slot_bytes=16 * GiB,
        devices=eight,
        utilization=0.9,
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
    )
    with pytest.raises(MemoryBudgetError, match="GPU 0") as err:
        check_gpu_fit(_dims(440), slot_bytes=16 * GiB, devices=eight, utilization=0.9)
    assert "tensor_parallel_size=8" in err.value.hint
    busy = [*eight[:5], (30 * GiB, 80 * GiB), *eight[6:]]  # another job holds most of GPU 5
    with pytest.raises(MemoryBudgetError, match="free on GPU 5"):
        check_gpu_fit(_dims(440), slot_bytes=16 * GiB, devices=busy, utilization=0.9, tensor_parallel_size=8)
    with pytest.raises(MemoryBudgetError, match="needs 8 GPUs but 4 are visible"):
        check_gpu_fit(_dims(100), slot_bytes=GiB, devices=eight[:4], utilization=0.9, tensor_parallel_size=8)


def test_gpu_sizing_reads_every_rank_and_never_starts_cuda_here(tmp_path, monkeypatch):
    """The API process sizes the engine from NVML (sizing.gpu_memory) for all tp ranks: calling
    torch.cuda here would create a CUDA context on GPU 0 (~0.5 GiB) and make vLLM spawn its workers."""
    from expertlib import sizing
    from expertlib.checkpoint import BaseCheckpoint
    from expertlib.engine import memory as engine
    from expertlib.testing import make_tiny_model

    make_tiny_model("qwen3_moe", tmp_path / "base")
    base = BaseCheckpoint(tmp_path / "base")

    def no_cuda(*a, **k):
        raise AssertionError("torch.cuda called in the API process")

    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(engine, "on_cpu", lambda: False)
    monkeypatch.setattr(sizing, "gpu_memory", lambda n: asked.append(n) or [(79 * GiB, 80 * GiB)] * n)
    kw, line = engine.size_memory(base, 4, {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8})
    assert asked == [2] and "each of 2 GPUs" in line and kw["tensor_parallel_size"] == 2


def test_pipeline_parallelism_and_the_routing_simulator_are_refused(monkeypatch):
    from expertlib.engine import start as engine
    from expertlib.errors import EngineError

    base = SimpleNamespace(config=SimpleNamespace(model_type="qwen3_moe"), path="/base")
    monkeypatch.delenv("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", raising=False)
    with pytest.raises(EngineError, match="pipeline parallelism") as err:
        engine.vllm_kwargs(base, 4, 2, {"pipeline_parallel_size": 2})
    assert "tensor_parallel_size" in err.value.hint
    monkeypatch.setenv("VLLM_MOE_ROUTING_SIMULATION_STRATEGY", "uniform_random")
    with pytest.raises(EngineError, match="routing simulator"):
        engine.vllm_kwargs(base, 4, 2, {})


def test_the_moe_kernel_is_checked_at_engine_start(monkeypatch):
    """expertlib_info (every engine start) refuses a GPU kernel slots cannot write, before any load."""
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from expertlib.errors import EngineError
    from expertlib.vllm_plugin.batch import install_set_id_hook
    from expertlib.vllm_plugin.worker import SlotWorkerExtension

    install_set_id_hook()

    def worker_with(impl):
        experts = _experts(impl)
        experts.w13_weight, experts.w2_weight = experts.w13_weight.to("meta"), experts.w2_weight.to("meta")
        runner = _layers().layers[0]
        runner.routed_experts = experts
        ctx = SimpleNamespace(layers={0: runner}, num_experts=3, slots=2, max_sets=2, expert_absmax=list)
        worker = SlotWorkerExtension()
        worker.model_runner = object.__new__(GPUModelRunner)
        worker._expertlib_ctx = lambda: ctx
        return worker

    assert worker_with(object.__new__(TritonExperts)).expertlib_info()["device"] == "meta"

    class FlashInferLikeExperts:
        pass

    with pytest.raises(EngineError, match="FlashInferLikeExperts"):
        worker_with(FlashInferLikeExperts()).expertlib_info()


# --- vLLM's tuned Triton MoE configs for E + S experts -------------------------------------------


@pytest.fixture
def on_h200(monkeypatch, tmp_path):
    """vLLM's config naming as on an H200 (it reads the device name through NVML), a fresh cache."""
    from vllm.model_executor.layers.fused_moe import fused_moe

    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda: "NVIDIA_H200_NVL")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER", raising=False)
    return tmp_path


def test_tuned_moe_config_is_copied_under_the_slot_layers_expert_count(on_h200, monkeypatch):
    """Qwen3-30B-A3B (E=128, N=768) with 16 slots: vLLM looks for E=144, which it does not ship."""
    import os

    from expertlib.vllm_plugin.moe_configs import shipped_configs_dir, use_tuned_configs

    shipped = shipped_configs_dir() / "E=128,N=768,device_name=NVIDIA_H200.json"
    assert shipped.is_file() and not (shipped.parent / "E=144,N=768,device_name=NVIDIA_H200.json").exists()
    written = use_tuned_configs(128, 16, 768, dtype="bfloat16")
    assert written.name == "E=144,N=768,device_name=NVIDIA_H200.json"
    assert written.read_bytes() == shipped.read_bytes()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(written.parent)
    again = use_tuned_configs(128, 16, 768, dtype="bfloat16")  # a second engine: same folder
    assert again == written and os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(written.parent)
    # tensor parallelism: each rank's N is I / tp
    assert use_tuned_configs(128, 16, 768, tensor_parallel_size=2).name == (
        "E=144,N=384,device_name=NVIDIA_H200.json"
    )
    # float32 has its own names; none is shipped: vLLM's default stays, said in the log
    assert use_tuned_configs(128, 16, 768, dtype="float32") is None


def test_a_users_tuned_config_folder_still_wins(on_h200, monkeypatch):
    import os

    from expertlib.vllm_plugin.moe_configs import use_tuned_configs

    user = on_h200 / "mine"
    user.mkdir()
    (user / "E=128,N=768,device_name=NVIDIA_H200.json").write_text('{"1": {"BLOCK_SIZE_M": 16}}')
    (user / "E=8,N=14336,device_name=NVIDIA_H200.json").write_text("{}")
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(user))
    written = use_tuned_configs(128, 8, 768)
    folder = written.parent
    assert folder != user and os.environ["VLLM_TUNED_CONFIG_FOLDER"] == str(folder)
    assert written.read_text() == '{"1": {"BLOCK_SIZE_M": 16}}'  # theirs, renamed for E + S
    assert (folder / "E=8,N=14336,device_name=NVIDIA_H200.json").is_file()  # their other files too
    assert sorted(p.name for p in user.iterdir()) == [  # their folder is never written
        "E=128,N=768,device_name=NVIDIA_H200.json",
        "E=8,N=14336,device_name=NVIDIA_H200.json",
    ]


def test_too_many_slots_for_the_triton_kernel_are_refused_up_front():
    from expertlib.errors import SlotError
    from expertlib.vllm_plugin.moe_configs import check_expert_count

    check_expert_count(512, 480)  # 992 padded: below 1024
    with pytest.raises(SlotError, match="993 once padded|1024 once padded") as err:
        check_expert_count(512, 481)
    assert "--slots 480" in err.value.hint
