"""Expert slots inside vLLM's fused MoE layers, and the router that remaps top-k ids per token.

Each fused MoE layer is built with E + S experts (`w13_weight (E+S, 2I, H)`, `w2_weight (E+S, H, I)`)
while its gate still scores the E real experts. After the router's top-k (unchanged):

    physical_ids = remap[layer][set_of_token, topk_ids]          # (T, K)

`remap[layer]` is (max_sets + 1, E); set row 0 is the identity (the base model), set row r maps the
experts replaced by the set in row r to its slots (physical ids E..E+S-1). The gather is done as one `take`
on the flat row-major table with per-token offsets `set_of_token * E` computed once per step on the
host, so each MoE layer adds one add and one gather (about 9 us on CPU for 32 tokens, eager).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from expertlib.vllm_plugin import CAPTURE_ROWS


def output_limit(dtype: torch.dtype) -> float:
    """The largest |value| a set-served token's MoE output keeps (`SlotContext.contain`): 2^16, and a
    64th of the largest float16 (1023.98) in float16, so a residual stream summing one such output per
    layer stays finite. A trained set's MoE outputs are orders of magnitude below it."""
    return min(OUTPUT_LIMIT, torch.finfo(dtype).max / 64) if dtype.is_floating_point else OUTPUT_LIMIT


#: Bound of a set-served token's MoE output in float32 and bfloat16 (see `output_limit`).
OUTPUT_LIMIT = 2.0**16

#: (part group of `expertlib.bounds`, the fused MoE layer's parameter holding it)
_WEIGHT_PARTS = (
    ("gate_up", "w13_weight"),
    ("down", "w2_weight"),
    ("gate_up_bias", "w13_bias"),
    ("down_bias", "w2_bias"),
)


class SlotContext:
    """Per-model state shared by every slot router: per-token set rows and the remap tables."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        slots: int,
        max_sets: int,
        max_tokens: int,
        device: torch.device | str,
    ):
        self.num_experts, self.slots, self.max_sets = num_experts, slots, max_sets
        self.device = torch.device(device)
        identity = torch.arange(num_experts, dtype=torch.int32, device=self.device)
        #: (L, max_sets + 1, E) physical expert id per (layer, set row, expert)
        self.remap = identity.repeat(num_layers, max_sets + 1, 1).contiguous()
        #: offset of every token's set row in a layer's flat remap table (row * E) for the current
        #: step; zero (the base row) beyond the step's tokens
        # One pinned staging buffer on CUDA, like vLLM's own CpuGpuBuffer inputs: the hook writes it
        # inside the runner's synchronize_input_prep(), after the previous step's copies finished, and
        # `_copied` guards callers outside that protocol. On CPU the routers read it directly.
        cuda = self.device.type == "cuda"
        self._host = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=cuda)
        self._host_np = self._host.numpy()  # shares memory with _host
        self.token_offsets = self._host if self.device.type == "cpu" else self._host.to(self.device)
        self._copied = torch.cuda.Event() if cuda else None
        #: host-to-device copies of the offsets so far (steps that changed nothing copy nothing)
        self.copies = 0
        self._filled = 0
        #: (L, CAPTURE_ROWS + 1, E) top-k picks per expert of each captured request (`model="auto"`,
        #: `count_routing`); row 0 counts every other token and is never read
        self.routing_counts = torch.zeros(
            num_layers, CAPTURE_ROWS + 1, num_experts, dtype=torch.float32, device=self.device
        )
        self._capture_host = torch.zeros(max_tokens, dtype=torch.int64)
        self.capture_rows = (
            self._capture_host if self.device.type == "cpu" else self._capture_host.to(self.device)
        )
        self._captured = 0
        #: MoE layer index -> the MoERunner of that layer
        self.layers: dict[int, Any] = {}

    def set_tokens(self, set_rows: list[int], per_request_tokens: list[int]) -> None:
        """Write each request's set row over its tokens of this step (requests in batch order).

        The buffer holds offsets for its first `_filled` tokens and zeros after them; a step whose
        offsets equal what the buffer holds (base-only steps, an unchanged batch) writes and copies
        nothing."""
        n = int(sum(per_request_tokens))
        if n > self._host.numel():
            raise RuntimeError(f"step has {n} tokens, slot buffer holds {self._host.numel()}")
        host = self._host_np
        new = None
        if any(set_rows):
            new = np.repeat(np.asarray(set_rows, dtype=np.int64) * self.num_experts, per_request_tokens)
            if n == self._filled and np.array_equal(host[:n], new):
                return
        elif not self._filled:
            return
        k = n if new is not None else 0
        m = max(k, self._filled)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the staging buffer
        host[k:m] = 0
        if new is not None:
            host[:n] = new
        if self.token_offsets is not self._host:
            self.token_offsets[:m].copy_(self._host[:m], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
            self.copies += 1
        self._filled = k

    def clear_tokens(self) -> None:
        self.set_tokens([], [])

    def set_capture(self, capture_rows: list[int], per_request_tokens: list[int]) -> None:
        """Write each request's capture row (0: not captured) over its tokens of this step; steps
        without a captured request after one without write nothing."""
        if not any(capture_rows) and not self._captured:
            return
        n = int(sum(per_request_tokens))
        host = self._capture_host.numpy()
        host[: max(n, self._captured)] = 0
        if any(capture_rows):
            host[:n] = np.repeat(np.asarray(capture_rows, dtype=np.int64), per_request_tokens)
        if self.capture_rows is not self._capture_host:
            self.capture_rows[: max(n, self._captured)].copy_(self._capture_host[: max(n, self._captured)])
        self._captured = n if any(capture_rows) else 0

    def counting(self) -> bool:
        """Whether the routers count this step's routing (`count_routing`): only when a captured
        request is in the step, so the capture costs nothing otherwise. Code that is traced or
        recorded once and then replayed without Python (torch.compile's graph on CPU, CUDA graphs)
        always holds the count: a branch there would be frozen at warm-up, where nothing is
        captured, and `model="auto"` would silently see no routing."""
        if torch.compiler.is_compiling():
            return True
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return True
        return self._captured > 0

    def count_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add this step's (T, K) logical top-k ids to each token's capture row of `layer`: one small
        scatter-add, with no branch on the data (as `remap_ids`)."""
        rows = self.capture_rows[: topk_ids.shape[0]].unsqueeze(1).expand(topk_ids.shape)  # (T, K)
        ones = torch.ones(topk_ids.numel(), dtype=self.routing_counts.dtype, device=topk_ids.device)
        self.routing_counts[layer].index_put_(
            (rows.reshape(-1), topk_ids.reshape(-1).long()), ones, accumulate=True
        )

    def take_routing(self, row: int) -> dict[int, list[float]]:
        """MoE layer -> (E,) top-k picks counted in capture row `row` since it was last taken; the row
        is zeroed."""
        counts = self.routing_counts[:, row].to("cpu", copy=True)  # (L, E), before the row is zeroed
        self.routing_counts[:, row].zero_()
        return {layer: counts[layer].tolist() for layer in sorted(self.layers)}

    def contain(self, out: torch.Tensor) -> torch.Tensor:
        """A MoE layer's (T, H) output with every row of a token served by an expert set made finite:
        NaN -> 0, then clamped to +-`output_limit` (inf included). Base tokens' rows are untouched.

        A set's tokens would otherwise carry inf/NaN into their KV cache blocks, which outlive the
        request: vLLM hands freed blocks to later requests without clearing them, and attention
        kernels read whole tiles of a block under a masked softmax (0 x NaN = NaN), so a stale NaN
        blanks whoever gets the block next (tests/test_attack_sets.py). Like `remap_ids`, no Python
        branch on the data and fixed shapes, so it stays valid under compilation and CUDA graphs."""
        rows = (self.token_offsets[: out.shape[0]] != 0).unsqueeze(1)  # (T, 1) served by a set
        limit = output_limit(out.dtype)
        clean = torch.nan_to_num(out, nan=0.0, posinf=limit, neginf=-limit).clamp_(-limit, limit)  # (T, H)
        return torch.where(rows, clean, out)

    def expert_absmax(self) -> list[list]:
        """[[layer, part group, max |w|], ...] over the base experts' rows of every MoE layer (this
        rank's shard): the statistics of the weight bound (`expertlib.bounds`). The kernel's layout
        (CPU prepacking, padding with zeros) moves values, never changes them, so any layout will do."""
        from expertlib.bounds import absmax

        out: list[list] = []
        for layer, runner in sorted(self.layers.items()):
            experts = runner.routed_experts
            for group, name in _WEIGHT_PARTS:
                t = getattr(experts, name, None)
                if isinstance(t, torch.Tensor):
                    out.append([layer, group, absmax(t[: self.num_experts])])
        return out

    def remap_ids(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """(T, K) logical expert ids -> (T, K) physical ids for each token's set."""
        # Always gather, even on base-only steps: a Python branch here would be frozen by vLLM's
        # trace-once compilation (the warm-up step has no sets) and silently drop every set.
        flat = topk_ids + self.token_offsets[: topk_ids.shape[0]].unsqueeze(1)  # (T, K) int64
        return self.remap[layer].take(flat).to(topk_ids.dtype)  # (T, K)


_ROUTER_CLASSES: dict[type, type] = {}

#: EXPERTLIB_ROUTING_CAPTURE=0 leaves the routing capture out of the routers (`model="auto"` then
#: sees no routing and always picks the base); bench/auto_route.py measures the capture's cost
#: against it, in process.
ROUTING_CAPTURE = os.environ.get("EXPERTLIB_ROUTING_CAPTURE", "1") != "0"


def slot_router_class(base: type) -> type:
    """A subclass of vLLM router class `base` whose top-k ids go through the slot remap table."""
    if base not in _ROUTER_CLASSES:

        def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
            weights, ids = base._compute_routing(
                self, hidden_states, router_logits, indices_type, input_ids=input_ids
            )
            if ROUTING_CAPTURE and self.expertlib_ctx.counting():
                self.expertlib_ctx.count_routing(self.expertlib_layer, ids)  # model="auto"
            ids = self.expertlib_ctx.remap_ids(self.expertlib_layer, ids)  # (T, K)
            return weights, ids.contiguous()

        _ROUTER_CLASSES[base] = type(f"Slot{base.__name__}", (base,), {"_compute_routing": _compute_routing})
    return _ROUTER_CLASSES[base]


_RUNNER_CLASSES: dict[type, type] = {}


def slot_runner_class(base: type) -> type:
    """A subclass of vLLM MoE runner class `base` whose routed output is contained per token
    (`SlotContext.contain`). `_forward_impl` is what the fused MoE custom op runs, so on a GPU the
    containment sits inside the op, as the remap does, and is captured with it in CUDA graphs."""
    if base not in _RUNNER_CLASSES:

        def _forward_impl(self, hidden_states, router_logits, shared_experts_input, input_ids=None):
            result = base._forward_impl(self, hidden_states, router_logits, shared_experts_input, input_ids)
            contain = self.router.expertlib_ctx.contain
            if isinstance(result, tuple):  # (shared experts' output, routed output)
                shared, routed = result
                return shared, contain(routed) if isinstance(routed, torch.Tensor) else routed
            return contain(result) if isinstance(result, torch.Tensor) else result

        _RUNNER_CLASSES[base] = type(f"Slot{base.__name__}", (base,), {"_forward_impl": _forward_impl})
    return _RUNNER_CLASSES[base]


@contextlib.contextmanager
def slot_moe_layers(module: Any, ctx_holder: dict[str, Any], slots: int) -> Iterator[None]:
    """While building a vLLM model, make `module.FusedMoEFactory` build layers with `slots` extra experts.

    Every built MoE runner is recorded in `ctx_holder["layers"]` as (layer index, runner, E); the
    model attaches the routers to its SlotContext once it knows the sizes.
    """
    from vllm.model_executor.models.utils import extract_layer_index

    original = module.FusedMoEFactory

    def factory(*args, **kwargs):
        if args or "num_experts" not in kwargs:
            raise RuntimeError("expertlib: FusedMoEFactory called positionally; vLLM version changed?")
        num_experts = int(kwargs["num_experts"])
        kwargs["num_experts"] = num_experts + slots
        runner = original(**kwargs)
        router = runner.router
        router.__class__ = slot_router_class(type(router))
        runner.__class__ = slot_runner_class(type(runner))
        layer = extract_layer_index(kwargs.get("prefix", ""))
        ctx_holder.setdefault("layers", []).append((layer, runner, num_experts))
        return runner

    module.FusedMoEFactory = factory
    try:
        yield
    finally:
        module.FusedMoEFactory = original
