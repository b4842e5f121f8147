"""Slot variants of vLLM's own MoE model classes (subclasses; no model code is copied).

`ExpertlibQwen2MoeForCausalLM` is `Qwen2MoeForCausalLM` built while the module's `FusedMoEFactory`
adds S expert slots to every fused MoE layer and gives its router the slot remap
(`expertlib.vllm_plugin.routing`). Slot rows are zeroed right after the checkpoint is loaded, before
vLLM's post-load processing (CPU prepacking), so they never hold uninitialised memory.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

from expertlib.vllm_plugin import MAX_SETS_FIELD, SLOT_ARCHITECTURES, SLOTS_FIELD
from expertlib.vllm_plugin.routing import SlotContext, slot_moe_layers

#: Tokens of headroom in the per-token set buffer beyond max_num_batched_tokens (spec tokens, padding).
_TOKEN_HEADROOM = 512


class SlotModelMixin:
    """Mixed in before a vLLM `*ForCausalLM`; exposes `expertlib_slots` (a SlotContext)."""

    _expertlib_module = None  # the vLLM model module whose FusedMoEFactory is wrapped

    def __init__(self, *, vllm_config, prefix: str = ""):
        cfg = vllm_config.model_config.hf_config
        slots = int(getattr(cfg, SLOTS_FIELD, 0) or 0)
        max_sets = int(getattr(cfg, MAX_SETS_FIELD, 0) or 0)
        holder: dict = {}
        with slot_moe_layers(self._expertlib_module, holder, slots):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        built = holder.get("layers", [])
        if not built:
            raise RuntimeError(f"expertlib: no fused MoE layer was built for {type(self).__name__}")
        num_experts = {e for _, _, e in built}
        assert len(num_experts) == 1, num_experts
        max_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens) + _TOKEN_HEADROOM
        ctx = SlotContext(
            num_layers=int(cfg.num_hidden_layers),
            num_experts=num_experts.pop(),
            slots=slots,
            max_sets=max_sets,
            max_tokens=max_tokens,
            device=vllm_config.device_config.device,
        )
        for layer, runner, _ in built:
            runner.router.expertlib_ctx = ctx
            runner.router.expertlib_layer = layer
            ctx.layers[layer] = runner
        self.expertlib_slots = ctx

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        loaded = super().load_weights(weights)
        ctx: SlotContext = self.expertlib_slots
        with torch.no_grad():
            for runner in ctx.layers.values():
                experts = runner.routed_experts
                for name in ("w13_weight", "w2_weight", "w13_bias", "w2_bias"):
                    p = getattr(experts, name, None)
                    if isinstance(p, torch.Tensor):
                        p.data[ctx.num_experts :].zero_()
        return loaded


def _slot_class(name: str) -> type:
    for module_name, cls_name, ours in SLOT_ARCHITECTURES.values():
        if ours == name:
            module = importlib.import_module(f"vllm.model_executor.models.{module_name}")
            base = getattr(module, cls_name)
            return type(ours, (SlotModelMixin, base), {"_expertlib_module": module, "__module__": __name__})
    raise AttributeError(name)


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """Classes are built on first use, so importing this module imports no vLLM model code."""
    if name not in _CLASSES:
        _CLASSES[name] = _slot_class(name)
    return _CLASSES[name]
