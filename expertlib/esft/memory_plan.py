"""Memory plan of an ESFT run, from the model config alone (no weights are loaded).

    plan = plan_training(config, trained_experts=48, batch_size=8, seq_len=2048, dtype="bfloat16")
    print(plan.render()); plan.check(device_capacity("cuda:0"), device="cuda:0")

Five parts, in bytes:

    base          every parameter of the model, in the base dtype (frozen; one copy)
    trained       the trained experts' slot copies, in the master dtype (fp32 by default)
    gradients     one gradient per trained element, in the master dtype
    optimizer     AdamW's exp_avg and exp_avg_sq per trained element (same dtype as the parameter)
    activations   what autograd keeps for the backward pass at batch x length, plus the logits

Parameter counts come from a weightless (meta) instance of the model, so they are exact.
Activations are estimated per decoder layer from the shapes (tokens T = batch x length):
attention projections and the attention matrix, the MoE block's gathered inputs and
intermediates (T x K rows), shared experts, norms and residuals; the loss adds the logits
and their float32 copy; the grouped matmul may copy one layer's routed experts (CPU does). With gradient checkpointing only each layer's input is kept, plus
one layer's full set during its recomputation. `tests/test_memory_plan.py` checks the
figures against peaks measured on CPU with `PeakTracker`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from expertlib.errors import DeviceError
from expertlib.shape import ModelShape
from expertlib.sizing import dtype_bytes, format_bytes

#: Fraction of a device's memory a plan may use (allocator fragmentation, CUDA context, workspace).
HEADROOM = 0.9
_PARTS = ("base", "trained", "gradients", "optimizer", "activations")


def layer_activation_bytes(
    shape: ModelShape, batch: int, seq_len: int, layer: int, act_bytes: int, *, mlp_only: bool = False
) -> int:
    """Bytes autograd keeps for one decoder layer's backward (frozen weights: inputs for grad-input).

    Counted per token: the float32 norm inputs and outputs (2 norms), q/k/v and the attention
    output, the attention matrix only with eager attention (SDPA / flash keep none), the MoE
    router logits (float32) and its T*K gathered rows (input H, gate/up 2I, activation I,
    output H), the shared experts (gate/up 2I_s, activation I_s) and the residual stream.
    `mlp_only`: the first trained layer, whose attention runs before anything needs a gradient.
    """
    t = batch * seq_len
    h, k = shape.hidden, shape.top_k
    if layer in shape.moe_layers:
        inter, shared = shape.expert_inter, shape.shared_inter
        mlp = t * k * (h + 3 * inter + h) * act_bytes + t * shape.num_experts * 4
        mlp += t * 3 * shared * act_bytes if shared else 0
    else:
        mlp = t * (h + 3 * shape.dense_inter) * act_bytes
    if mlp_only:
        return mlp + t * h * act_bytes
    qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_dim + shape.heads * shape.head_dim
    attn = batch * shape.heads * seq_len * seq_len * act_bytes if shape.eager_attention else 0
    norms = 2 * 2 * t * h * 4
    residual = 3 * t * h * act_bytes
    return t * qkv * act_bytes + attn + norms + residual + mlp


def logits_bytes(shape: ModelShape, batch: int, seq_len: int, act_bytes: int) -> int:
    """The logits (compute dtype), their float32 copy for the loss, its log-softmax and its gradient."""
    t = batch * seq_len
    return t * shape.vocab * (act_bytes + 4 + 4 + 4)


def backward_transient_bytes(shape: ModelShape, batch: int, seq_len: int) -> int:
    """Gradients in flight in one MoE layer's backward (float32): T*K rows of gate/up and output, residual."""
    t = batch * seq_len
    return t * (shape.top_k * (3 * shape.expert_inter + shape.hidden) + 2 * shape.hidden) * 4


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part of a training run; `total` is their sum (the peak of a step)."""

    shape: ModelShape
    base: int
    trained: int
    gradients: int
    optimizer: int
    activations: int
    trained_params: int
    batch_size: int
    seq_len: int
    dtype: str
    master_dtype: str
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.base + self.trained + self.gradients + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, str, str]]:
        """(part, size, what) rows, for a table."""
        what = {
            "base (frozen)": f"{human_count(self.shape.total_params)} params in {self.dtype}",
            "trained experts": f"{human_count(self.trained_params)} params in {self.master_dtype}",
            "gradients": f"{self.master_dtype}, trained params only",
            "optimizer (AdamW)": "exp_avg + exp_avg_sq",
            "activations": f"batch {self.batch_size} x length {self.seq_len}"
            + (", checkpointed" if self.gradient_checkpointing else ""),
        }
        sizes = [self.base, self.trained, self.gradients, self.optimizer, self.activations]
        rows = [(k, format_bytes(v), what[k]) for k, v in zip(what, sizes, strict=True)]
        return [*rows, ("total", format_bytes(self.total), "")]

    def render(self) -> str:
        width = max(len(r[0]) for r in self.rows())
        return "\n".join(f"{p:<{width}}  {s:>10}  {w}" for p, s, w in self.rows())

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "trained": self.trained,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
            "trained_params": self.trained_params,
        }

    def suggestions(self, capacity: int) -> list[str]:
        """What would make the plan fit `capacity` bytes, most effective first."""
        out = []
        budget = capacity * HEADROOM
        if self.dtype == "float32":
            out.append("--dtype bfloat16 (halves the frozen base)")
        if not self.gradient_checkpointing and self.activations > 0.2 * budget:
            out.append("--gradient-checkpointing (keeps one layer's activations)")
        if self.activations > 0.2 * budget and self.batch_size > 1:
            out.append("a smaller --batch-size with --grad-accum (same effective batch)")
        if self.base > 0.5 * budget:
            out.append(
                "more GPUs: --device-map auto spreads the frozen base over them (accelerate), "
                "or data-parallel `torchrun --nproc-per-node N` when one copy fits"
            )
        if self.master_dtype == "float32" and self.trained + self.gradients + self.optimizer > 0.2 * budget:
            out.append("--master-dtype bfloat16, or fewer experts (--max-per-layer)")
        return out or ["a device with more memory"]

    def check(self, capacity: int, *, device: str) -> None:
        """Raise DeviceError when the plan does not fit `capacity` bytes (with HEADROOM)."""
        if self.total <= capacity * HEADROOM:
            return
        parts = sorted(self.to_dict().items(), key=lambda kv: -kv[1])
        largest = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts if k in _PARTS)
        raise DeviceError(
            f"training needs about {format_bytes(self.total)} ({largest}) but {device} has "
            f"{format_bytes(capacity)} ({HEADROOM:.0%} usable)",
            hint="try " + "; ".join(self.suggestions(capacity)),
        )


def plan_training(
    config: Any,
    *,
    trained_experts: int,
    batch_size: int,
    seq_len: int,
    dtype: Literal["float32", "bfloat16"] = "float32",
    master_dtype: Literal["float32", "bfloat16"] = "float32",
    gradient_checkpointing: bool = False,
    extra_trained_params: int = 0,
    first_trained_layer: int | None = None,
    shape: ModelShape | None = None,
) -> MemoryPlan:
    """The memory plan of training `trained_experts` routed experts (over all layers) of `config`.

    Activations are kept from the first trained layer's MoE block on (`first_trained_layer`,
    default the first MoE layer; 0 with `extra_trained_params` from the ablation flags, which
    may train the embeddings).
    """
    shape = shape or ModelShape.from_config(config)
    if first_trained_layer is None:
        first_trained_layer = 0 if extra_trained_params else shape.moe_layers[0]
    act = dtype_bytes(dtype)
    master = dtype_bytes(master_dtype)
    n_trained = trained_experts * shape.params_per_expert
    # extras (ablation flags) train in place, in the base dtype
    trained = n_trained * master
    extra = extra_trained_params * act
    first = first_trained_layer
    per_layer = [
        layer_activation_bytes(
            shape, batch_size, seq_len, i, act, mlp_only=i == first and not extra_trained_params
        )
        for i in range(first, shape.num_layers)
    ]
    if gradient_checkpointing:
        acts = len(per_layer) * batch_size * seq_len * shape.hidden * act + max(per_layer)
    else:
        acts = sum(per_layer)
    acts += logits_bytes(shape, batch_size, seq_len, act) + backward_transient_bytes(
        shape, batch_size, seq_len
    )
    # grouped-matmul workspace: the CPU path copies a layer's fused expert tensor (transposed) per call
    acts += shape.num_experts * shape.params_per_expert * act
    if act != master:  # autocast keeps a compute-dtype copy of each trained weight for the backward
        acts += n_trained * act
    return MemoryPlan(
        shape=shape,
        base=shape.total_params * act,
        trained=trained,
        gradients=trained + extra,
        optimizer=2 * (trained + extra),
        activations=acts,
        trained_params=n_trained + extra_trained_params,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        master_dtype=master_dtype,
        gradient_checkpointing=gradient_checkpointing,
    )


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.4g}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


# --- measuring ---------------------------------------------------------------------------------------


class PeakTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active (any device, CPU included).

    Every op's outputs are counted once per storage until the storage is freed, so the peak
    is exact for what runs under the mode (forward, backward and optimizer step), without the
    allocator's caching or the process's other memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        n = storage.nbytes()
        if n == 0 or key in self._live:
            return
        self._live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: tuple[str, int]) -> None:
        self.current -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out
