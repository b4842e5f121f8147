"""Tiny bases and random expert sets for the vLLM engine's tests and benchmarks (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Config overrides that make a tiny model runnable by vLLM's CPU kernels: attention head size 32 or
#: 64 (16 is not supported by the CPU attention backend), MLA with kv_lora_rank 512 / rope dim 64.
VLLM_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(num_attention_heads=2, num_key_value_heads=2),
    "qwen3_moe": dict(head_dim=32),
    "mixtral": dict(num_attention_heads=2, num_key_value_heads=2),
    "olmoe": dict(num_attention_heads=2, num_key_value_heads=2),
    "deepseek_v2": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64),
    "deepseek_v3": dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64),
}


def hf_greedy(model, tok, prompt: str, max_tokens: int) -> list[int]:
    """Greedy continuation token ids from a transformers model: the reference vLLM outputs must equal."""
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


#: dtype vLLM's CPU kernels need per architecture (MLA attention on CPU only takes bf16 weights).
VLLM_TINY_DTYPE: dict[str, torch.dtype] = {"deepseek_v2": torch.bfloat16, "deepseek_v3": torch.bfloat16}


def make_vllm_tiny_base(
    model_type: str, path: str | Path, *, seed: int = 0, dtype: torch.dtype | None = None, **overrides
):
    """A tiny random base (config, weights, tokenizer) at `path` that vLLM's CPU engine can run.

    Saved in `dtype` (default: what vLLM's CPU kernels need for the architecture, else float32).
    """
    from expertlib.testing import make_tiny_model

    model = make_tiny_model(
        model_type, path, seed=seed, **{**VLLM_TINY_OVERRIDES.get(model_type, {}), **overrides}
    )
    dtype = dtype or VLLM_TINY_DTYPE.get(model_type, torch.float32)
    if dtype != torch.float32:
        model = model.to(dtype)
        model.save_pretrained(str(path))
    return model


def random_expert_set(
    base_model,
    task: str,
    experts: dict[int, list[int]],
    *,
    seed: int = 0,
    scale: float = 0.5,
    copy_from: dict[tuple[int, int], Any] | None = None,
):
    """An ExpertSet replacing `experts` of `base_model` with randomly perturbed copies.

    `copy_from` maps (layer, expert) -> ExpertWeights to use verbatim (to build sets that share
    identical experts, for dedup). The base model is left unchanged.
    """
    from expertlib.apply import extract_expert_set
    from expertlib.moe import read_expert, write_expert

    g = torch.Generator().manual_seed(seed)
    saved = {}
    try:
        for layer, ids in experts.items():
            for e in ids:
                w = read_expert(base_model, layer, e)
                saved[(layer, e)] = w
                if copy_from and (layer, e) in copy_from:
                    new = copy_from[(layer, e)]
                else:
                    new = w.map(
                        lambda t: (
                            t
                            + scale
                            * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype)
                        )
                    )
                write_expert(base_model, layer, e, new)
        digests = {k: w.digest() for k, w in saved.items()}
        return extract_expert_set(
            base_model, digests, task=task, experts=experts, base_identity_=_identity(base_model)
        )
    finally:
        for (layer, e), w in saved.items():
            write_expert(base_model, layer, e, w)


def _identity(model):
    from expertlib.identity import base_identity

    return base_identity(model)


#: The benchmark base (bench/train_cost.py's routed experts, with a 512-wide shared expert): qwen2_moe,
#: hidden 256, 4 MoE layers of 64 routed experts (top-6, intermediate 128) + a shared expert.
BENCH_BASE: dict[str, Any] = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=512,
)


def make_bench_sets(model, n: int, experts_per_layer: int = 2, *, seed: int = 0, noise: float = 0.1) -> list:
    """`n` random expert sets, each replacing `experts_per_layer` experts in every MoE layer (what
    ESFT-token selected on the benchmark task), chosen at random so that sets overlap as tasks do.

    Each replaced expert is the base expert plus Gaussian noise of `noise` times the std of the
    base's expert weights: a fine-tuning-sized change, so the routing of later layers moves about as
    much as a trained set moves it (the tests' default, 0.5 absolute, is ~25x the weights and
    scatters routing far more than fine-tuning does)."""
    from expertlib.moe import experts_module, moe_layer_indices, read_expert

    layers = moe_layer_indices(model)
    num_experts = experts_module(model, layers[0]).num_experts
    scale = noise * float(read_expert(model, layers[0], 0).gate.float().std())
    g = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(n):
        experts = {
            layer: sorted(torch.randperm(num_experts, generator=g)[:experts_per_layer].tolist())
            for layer in layers
        }
        sets.append(random_expert_set(model, f"task{i}", experts, seed=seed + 1000 + i, scale=scale))
    return sets


def cpu_moe_runner(n: int, inter: int, hidden: int, dtype=torch.bfloat16, fill: float = 7.0):
    """A stand-in for one MoE layer's runner on vLLM's CPU kernel, `n` expert rows filled with `fill`:
    what `expertlib.vllm_plugin.worker`'s packing and copies see (padding and prepacking as vLLM does),
    without an engine."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    impl = object.__new__(CPUUnquantizedExperts)
    impl._use_zentorch = False
    impl.moe_config = SimpleNamespace(intermediate_size_per_partition=inter, activation=MoEActivation.SILU)
    method = object.__new__(UnquantizedFusedMoEMethod)
    method.moe_kernel = SimpleNamespace(fused_experts=impl)
    padded = CPUUnquantizedExperts._padded_intermediate_size(impl.moe_config)
    experts = SimpleNamespace(
        quant_method=method,
        w13_weight=torch.full((n, 2 * padded, hidden), fill, dtype=dtype),
        w2_weight=torch.full((n, hidden, padded), fill, dtype=dtype),
    )
    par = SimpleNamespace(use_ep=False, tp_size=1)
    return SimpleNamespace(routed_experts=experts, moe_config=SimpleNamespace(moe_parallel_config=par))
