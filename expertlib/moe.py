"""Access to the routed experts of a transformers MoE model, one canonical form for all.

transformers 5 keeps every routed expert of a layer in two fused 3-D parameters on the
`experts` module (`gate_up_proj`, `down_proj`); the layout flags `is_transposed` and
`is_concatenated` (set by `@use_experts_implementation`) say how gate and up sit in them.
This module reads and writes routed expert `e` of layer `l` in one canonical form:

    gate (I, H), up (I, H), down (H, I)          [+ gate_bias (I,), up_bias (I,), down_bias (H,)]

bit-exactly, whatever the architecture's layout. Everything else in expertlib (patches,
scoring, slots, the vLLM plugin) speaks this form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from expertlib.errors import ModelLoadError, PatchShapeError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """What differs between architectures, beyond the fused layout flags on the module."""

    model_type: str
    #: config field holding the number of routed experts
    experts_field: str
    #: attribute of the MoE block holding shared experts, if any
    shared_attr: str | None = None
    #: checkpoint key of one routed expert's projection on disk, None when stored fused
    checkpoint_key: str | None = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
    #: on-disk projection names for (gate, up, down)
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("qwen2_moe", "num_experts", shared_attr="shared_expert"),
        ArchSpec("qwen3_moe", "num_experts"),
        ArchSpec(
            "mixtral",
            "num_local_experts",
            checkpoint_key="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
            proj_names=("w1", "w3", "w2"),
        ),
        ArchSpec("olmoe", "num_experts"),
        ArchSpec("deepseek_v2", "n_routed_experts", shared_attr="shared_experts"),
        ArchSpec("deepseek_v3", "n_routed_experts", shared_attr="shared_experts"),
        ArchSpec("gpt_oss", "num_local_experts", checkpoint_key=None),
    )
}
SUPPORTED_ARCHITECTURES = sorted(ARCHITECTURES)

EXPERT_PARTS = ("gate", "up", "down")
BIAS_PARTS = ("gate_bias", "up_bias", "down_bias")


def arch_spec(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(model_type, SUPPORTED_ARCHITECTURES) from None


@dataclass
class ExpertWeights:
    """One routed expert in canonical form: gate (I, H), up (I, H), down (H, I), optional biases."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(part, tensor) for every present part, in canonical order."""
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None:
                yield f.name, t

    def map(self, fn) -> ExpertWeights:
        return ExpertWeights(**{name: fn(t) for name, t in self.items()})

    def digest(self) -> str:
        return expert_digest(self)

    def equal(self, other: ExpertWeights) -> bool:
        a, b = dict(self.items()), dict(other.items())
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expert_digest(w: ExpertWeights) -> str:
    """sha256 of an expert in canonical form, dtype-independent for exact upcasts.

    Tensors are hashed as float32 bytes, so a bf16 checkpoint loaded as fp32 keeps its digest.
    """
    h = hashlib.sha256()
    for name, t in w.items():
        _hash_float32(h, name, t)
    return "sha256:" + h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of one tensor as float32 bytes (same rule as `expert_digest`)."""
    h = hashlib.sha256()
    _hash_float32(h, "tensor", t)
    return "sha256:" + h.hexdigest()


def _hash_float32(h, name: str, t: torch.Tensor) -> None:
    t32 = t.detach().to("cpu", torch.float32).contiguous()
    h.update(f"{name}:{tuple(t32.shape)};".encode())
    h.update(t32.numpy().tobytes())


@dataclass(frozen=True)
class MoESpec:
    """The MoE structure of a model, as `expertlib inspect` prints it."""

    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_shared_experts: int
    hidden_size: int
    expert_intermediate_size: int
    has_bias: bool
    params_per_expert: int
    total_params: int

    @property
    def routed_expert_params(self) -> int:
        return self.params_per_expert * self.num_experts * len(self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["moe_layers"] = list(self.moe_layers)
        d["routed_expert_params"] = self.routed_expert_params
        return d


# --- locating modules ------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (or of its base model)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "model"):
        layers = getattr(inner.model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(_model_type(model), SUPPORTED_ARCHITECTURES)
    return layers


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def moe_block(model: nn.Module, layer: int) -> nn.Module:
    """The sparse MoE block (router + experts [+ shared experts]) of decoder layer `layer`."""
    mlp = decoder_layers(model)[layer].mlp
    if not hasattr(mlp, "experts"):
        raise PatchShapeError(
            f"layer {layer} is not a Mixture-of-Experts layer", hint=_moe_layers_hint(model)
        )
    return mlp


def experts_module(model: nn.Module, layer: int) -> nn.Module:
    """The fused routed-experts module of layer `layer` (holds gate_up_proj and down_proj)."""
    return moe_block(model, layer).experts


def moe_layer_indices(model: nn.Module) -> list[int]:
    return [
        i for i, layer in enumerate(decoder_layers(model)) if hasattr(getattr(layer, "mlp", None), "experts")
    ]


def _moe_layers_hint(model: nn.Module) -> str:
    return f"MoE layers of this model: {moe_layer_indices(model)}"


def check_supported(model: nn.Module) -> ArchSpec:
    return arch_spec(_model_type(model))


def describe(model: nn.Module) -> MoESpec:
    """MoE structure of a loaded model: MoE layers, routed/shared experts, sizes, parameter counts."""
    spec = check_supported(model)
    cfg = model.config
    layers = moe_layer_indices(model)
    if not layers:
        raise UnsupportedArchitectureError(spec.model_type, SUPPORTED_ARCHITECTURES)
    ex = experts_module(model, layers[0])
    w = read_expert(model, layers[0], 0)
    inter, hidden = w.gate.shape
    n_shared = getattr(cfg, "n_shared_experts", None)
    if n_shared is None:
        n_shared = (
            1 if spec.shared_attr and getattr(moe_block(model, layers[0]), spec.shared_attr, None) else 0
        )
    return MoESpec(
        model_type=spec.model_type,
        num_layers=len(decoder_layers(model)),
        moe_layers=tuple(layers),
        num_experts=int(ex.num_experts),
        top_k=int(cfg.num_experts_per_tok),
        num_shared_experts=int(n_shared or 0),
        hidden_size=int(hidden),
        expert_intermediate_size=int(inter),
        has_bias=bool(getattr(ex, "has_bias", False)),
        params_per_expert=sum(t.numel() for _, t in w.items()),
        total_params=sum(p.numel() for p in model.parameters()),
    )


# --- reading and writing one expert -----------------------------------------------------------------


def expert_views(ex: nn.Module, e: int) -> ExpertWeights:
    """Views into the fused parameters for expert `e`, in canonical orientation (no copy: writing to
    them writes the model; `read_expert` returns a copy). Used by the slots and the lazy checkpoint
    reader, which hold tensors laid out like an experts module."""
    gu, dn = ex.gate_up_proj, ex.down_proj
    transposed = getattr(ex, "is_transposed", False)
    concatenated = getattr(ex, "is_concatenated", True)
    g = gu[e].T if transposed else gu[e]  # (2I, H)
    d = dn[e].T if transposed else dn[e]  # (H, I)
    inter = g.shape[0] // 2
    gate, up = (g[:inter], g[inter:]) if concatenated else (g[0::2], g[1::2])  # (I, H) each
    w = ExpertWeights(gate=gate, up=up, down=d)
    if getattr(ex, "has_bias", False):
        gb = ex.gate_up_proj_bias[e]  # (2I,)
        w.gate_bias, w.up_bias = (gb[:inter], gb[inter:]) if concatenated else (gb[0::2], gb[1::2])
        w.down_bias = ex.down_proj_bias[e]  # (H,)
    return w


def _check_index(model: nn.Module, layer: int, expert: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise PatchShapeError(
            f"layer {layer} out of range (model has {len(layers)})", hint=_moe_layers_hint(model)
        )
    ex = experts_module(model, layer)
    if not 0 <= expert < ex.num_experts:
        raise PatchShapeError(
            f"expert {expert} out of range in layer {layer} (model has {ex.num_experts} routed experts)",
            hint="expert ids count from 0",
        )
    return ex


def read_expert(model: nn.Module, layer: int, expert: int) -> ExpertWeights:
    """A copy of routed expert `expert` of layer `layer` in canonical form."""
    ex = _check_index(model, layer, expert)
    return expert_views(ex, expert).map(lambda t: t.detach().clone().contiguous())


@torch.no_grad()
def write_expert(model: nn.Module, layer: int, expert: int, weights: ExpertWeights) -> None:
    """Overwrite routed expert `expert` of layer `layer` in place (dtype cast to the model's)."""
    ex = _check_index(model, layer, expert)
    views = expert_views(ex, expert)
    want = dict(views.items())
    got = dict(weights.items())
    if want.keys() != got.keys():
        raise PatchShapeError(
            f"layer {layer} expert {expert}: parts {sorted(got)} do not match the model's {sorted(want)}",
            hint="was the patch made for a model with expert biases?",
        )
    for name, view in want.items():
        if tuple(view.shape) != tuple(got[name].shape):
            raise PatchShapeError(
                f"layer {layer} expert {expert} {name}: shape {tuple(got[name].shape)}, model needs {tuple(view.shape)}",
                hint="the patch was made for a base model of another size",
            )
    for name, view in want.items():
        view.copy_(got[name].to(view.dtype))


def iter_experts(model: nn.Module) -> Iterator[tuple[int, int]]:
    for layer in moe_layer_indices(model):
        for e in range(experts_module(model, layer).num_experts):
            yield layer, e


# --- loading a base model ----------------------------------------------------------------------------


def load_model(path_or_id: str | Path, dtype: torch.dtype | str | None = None, **kwargs) -> nn.Module:
    """Load a supported MoE causal LM from a local folder (or a hub id when the network allows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(path_or_id))
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on the failure
        raise ModelLoadError(
            f"cannot load a model config from {str(path_or_id)!r}: {exc}",
            hint="pass a folder written by save_pretrained (config.json + safetensors) or a reachable hub id",
        ) from exc
    arch_spec(cfg.model_type)
    kwargs.setdefault("dtype", dtype if dtype is not None else "auto")
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)
    model.eval()
    return model
