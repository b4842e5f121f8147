"""vLLM plugin: expert slots in vLLM's own MoE models, per-request expert sets, hot load/unload.

`register()` is the `vllm.general_plugins` entry point, so vLLM runs it in every process it starts.
It registers one out-of-tree architecture per supported MoE model (`Expertlib<Arch>`), each a thin
subclass of vLLM's own class whose fused MoE layers carry S extra expert slots, and wraps the model
runner so that each token's expert-set row reaches the routers. An engine selects a slot
architecture through `hf_overrides` (see `slot_hf_overrides`), so a normal HF folder works.

Private vLLM APIs touched (vllm==0.32.0 is pinned; tests/test_vllm_*.py fail if one moves):
- `GPUModelRunner._init_model_kwargs` (wrapped), `.requests[req_id].sampling_params`,
  `.input_batch.req_ids/num_reqs`, `.query_start_loc.np`, `.get_model()`  (batch.py);
- the module-level name `FusedMoEFactory` in each vLLM model module (swapped while the model is built),
  its keyword-only call, `MoERunner.router`, `BaseRouter._compute_routing`, `MoERunner._forward_impl`
  (subclassed: the routed output of set-served tokens is made finite) (routing.py);
- `MoERunner.routed_experts.w13_weight/w2_weight`, `.quant_method.moe_kernel.fused_experts`,
  `UnquantizedFusedMoEMethod`, `CPUUnquantizedExperts.isa/_padded_intermediate_size/_use_zentorch`,
  `cpu_prepack_moe_weight`, `MoERunner.moe_config.moe_parallel_config` (worker.py);
- `GPUModelRunner.sample_tokens` (wrapped on CPU), `.execute_model_state`, `.discard_request_mask`,
  `.input_batch.generators` (fixes.py);
- worker extensions (`worker_extension_cls`) and `collective_rpc` are public.
"""

from __future__ import annotations

import os
from typing import Any

#: extra_args key carrying a request's set row (an int; 0 or absent = the base model).
SET_ROW_KEY = "expertlib_set"
#: extra_args key of a request whose prompt routing is counted (`model="auto"`): its capture row,
#: 1..CAPTURE_ROWS, read back with the workers' `expertlib_take_routing`.
CAPTURE_KEY = "expertlib_capture"
CAPTURE_ROWS = 8
#: hf_config fields the slot models read (set through hf_overrides).
SLOTS_FIELD = "expertlib_slots"
MAX_SETS_FIELD = "expertlib_max_sets"

#: transformers model_type -> (vLLM module, vLLM class, our class name).
SLOT_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", "ExpertlibQwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", "ExpertlibQwen3MoeForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM", "ExpertlibMixtralForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM", "ExpertlibOlmoeForCausalLM"),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2ForCausalLM", "ExpertlibDeepseekV2ForCausalLM"),
    "deepseek_v3": ("deepseek_v2", "DeepseekV3ForCausalLM", "ExpertlibDeepseekV3ForCausalLM"),
}

#: Worker extension class giving workers the hot load/unload methods (collective_rpc targets).
WORKER_EXTENSION = "expertlib.vllm_plugin.worker.SlotWorkerExtension"


def slot_hf_overrides(model_type: str, *, slots: int, max_sets: int) -> dict[str, Any]:
    """hf_overrides that make vLLM build the slot variant of `model_type` with these sizes."""
    from expertlib.errors import UnsupportedArchitectureError

    if model_type not in SLOT_ARCHITECTURES:
        raise UnsupportedArchitectureError(model_type, sorted(SLOT_ARCHITECTURES))
    # Per-request sets reach the routers through the V1 model runner (batch.py). vLLM 0.32 picks its
    # V2 runner wherever Triton is installed (every CUDA install): keep V1 unless the user chose.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {
        "architectures": [SLOT_ARCHITECTURES[model_type][2]],
        SLOTS_FIELD: int(slots),
        MAX_SETS_FIELD: int(max_sets),
    }


def register() -> None:
    """Entry point: register the slot architectures, the per-token set-id hook and the CPU seeded-sampling
    fix, and make vLLM's child processes die with their parent (`lifeline`) (idempotent)."""
    from vllm import ModelRegistry

    for _module, _cls, ours in SLOT_ARCHITECTURES.values():
        if ours not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(ours, f"expertlib.vllm_plugin.models:{ours}")
    from expertlib.vllm_plugin.batch import install_set_id_hook
    from expertlib.vllm_plugin.fixes import install_cpu_seed_fix
    from expertlib.vllm_plugin.lifeline import install as install_lifeline

    install_set_id_hook()
    install_cpu_seed_fix()
    install_lifeline()
