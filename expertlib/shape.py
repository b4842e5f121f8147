"""A model's dimensions from its config alone (no weights): `ModelShape`, the one description of a base's
sizes that training's memory plan (`expertlib.esft.memory_plan`) and serving's sizing
(`expertlib.sizing`) both use.

    shape = ModelShape.from_config(load_config("./base"))
    shape.params_per_expert, shape.kv_per_token, shape.moe_layers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: ModelShape.from_config's results by config (a handful per process).
_SHAPES: dict[tuple[str, str | None], ModelShape] = {}


@dataclass(frozen=True)
class ModelShape:
    """A model's dimensions, read from a weightless (meta) instance of its config: exact parameter
    counts, attention and MoE widths, and the KV cache one token takes."""

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_inter: int
    shared_inter: int  # summed intermediate width of the shared experts (0: none)
    dense_inter: int  # intermediate width of dense (non-MoE) MLP layers
    params_per_expert: int
    total_params: int
    kv_per_token: int = 0  # KV cache elements one token takes over all layers (MLA: its latent)
    max_position: int | None = None
    eager_attention: bool = False  # attention implementation keeps the (B, heads, S, S) matrix

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of `config`'s model (remembered per config: serving sizes its engine from it)."""
        key = (config.to_json_string(use_diff=False), getattr(config, "_attn_implementation", None))
        if key not in _SHAPES:
            _SHAPES[key] = cls._measure(config)
        return _SHAPES[key]

    @classmethod
    def _measure(cls, config: Any) -> ModelShape:
        from transformers import AutoModelForCausalLM

        from expertlib.moe import arch_spec, describe, moe_block

        arch_spec(config.model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        spec = describe(model)
        shared = 0
        attr = arch_spec(config.model_type).shared_attr
        if attr is not None:
            mod = getattr(moe_block(model, spec.moe_layers[0]), attr, None)
            if mod is not None:
                shared = sum(p.numel() for p in mod.parameters() if p.dim() == 2) // (3 * spec.hidden_size)
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or spec.hidden_size // heads
        if getattr(config, "qk_nope_head_dim", None):  # MLA: q/k carry nope + rope parts
            head_dim = int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim)
        return cls(
            model_type=spec.model_type,
            num_layers=spec.num_layers,
            moe_layers=spec.moe_layers,
            hidden=spec.hidden_size,
            vocab=int(config.vocab_size),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            expert_inter=spec.expert_intermediate_size,
            shared_inter=int(shared),
            dense_inter=int(getattr(config, "intermediate_size", 0) or 0),
            params_per_expert=spec.params_per_expert,
            total_params=spec.total_params,
            kv_per_token=kv_per_token(config),
            max_position=getattr(config, "max_position_embeddings", None),
            eager_attention=getattr(model.config, "_attn_implementation", "eager") == "eager",
        )


def kv_per_token(cfg: Any) -> int:
    """KV cache elements one token takes in every attention layer (MLA: one latent per layer)."""
    layers = int(cfg.num_hidden_layers)
    if getattr(cfg, "kv_lora_rank", None):  # MLA: compressed latent + rope key, shared by all heads
        return layers * (int(cfg.kv_lora_rank) + int(getattr(cfg, "qk_rope_head_dim", 0) or 0))
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
    return 2 * layers * kv_heads * int(head_dim)
