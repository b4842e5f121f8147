"""Tiny random MoE models and an offline tokenizer, for tests, benchmarks and examples.

Nothing here touches the network: configs are built in code, the tokenizer is the demo world's
character-level one (`expertlib.demo.tokenizer`, re-exported here). Hidden sizes are multiples of 32 (vLLM's CPU kernels need it).

    path = make_tiny_model("qwen2_moe", tmp_path / "base")   # config + weights + tokenizer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from expertlib.demo.tokenizer import make_tokenizer  # re-exported: tests import it from here

#: DeepSeek's MoE with multi-head latent attention (v2; v3 routes with noaux_tc): one dense layer first.
_DEEPSEEK: dict[str, Any] = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_group=1,
    topk_group=1,
    num_hidden_layers=3,
    rope_scaling=None,
)
#: Per-architecture config fields of a tiny model (on top of TINY_COMMON).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=64),
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": {**_DEEPSEEK, "topk_method": "noaux_tc"},
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, head_dim=16),
}

TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=96,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    from expertlib.moe import arch_spec

    arch_spec(model_type)
    tok = make_tokenizer()
    kw = {**TINY_COMMON, **TINY_CONFIGS[model_type], **overrides}
    kw.setdefault("vocab_size", 128 if len(tok) <= 128 else len(tok))
    if model_type == "gpt_oss":
        kw.setdefault("layer_types", ["full_attention"] * kw["num_hidden_layers"])
    cfg = AutoConfig.for_model(
        model_type,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **kw,
    )
    return cfg


def make_tiny_model(model_type: str, path: str | Path | None = None, *, seed: int = 0, **overrides):
    """A tiny randomly initialised MoE causal LM; with `path`, saved there with the tokenizer.

    Returns the model (in eval mode, float32).
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Default init leaves routers at zero in some architectures; give every router real preferences
    # so routing (and ESFT scoring) is not degenerate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or ".mlp.gate." in name:
                p.normal_(0.0, 0.5)
            elif p.dim() >= 2 and float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.02)
    model.eval()
    if path is not None:
        path = Path(path)
        model.save_pretrained(str(path))
        make_tokenizer(path)
    return model


def first_greedy_gap(out, ref) -> tuple[int | None, float]:
    """Where two vLLM runs' greedy tokens first differ (None: one extends the other), and how near a tie
    it was: the smaller of the two runs' logprob gaps between their choices there (inf when neither
    run's top logprobs hold the other's choice)."""
    got, want = list(out.outputs[0].token_ids), list(ref.outputs[0].token_ids)
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if i is None:
        return None, 0.0
    gaps = [
        lps[i][mine].logprob - lps[i][theirs].logprob
        for lps, mine, theirs in (
            (out.outputs[0].logprobs, got[i], want[i]),
            (ref.outputs[0].logprobs, want[i], got[i]),
        )
        if theirs in lps[i]
    ]
    return i, min(gaps) if gaps else float("inf")
