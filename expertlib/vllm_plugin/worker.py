"""Hot load/unload on vLLM workers: write expert slots and remap rows while the engine serves.

vLLM mixes `SlotWorkerExtension` into its worker class (engine arg `worker_extension_cls`); the engine
front end calls these methods by name through `collective_rpc`, which runs them between forward
steps, so a step never sees a half-written set. Arguments are plain ints, strings and lists (they
cross process boundaries); expert tensors are read on the worker from the set's safetensors file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expertlib.moe import ExpertWeights


class _Prepack:
    """The CPU kernel's layout of expert rows: the intermediate size padded, every expert prepacked
    (independently of the others) for its grouped GEMM."""

    def __init__(self, impl, inter: int):
        self.impl, self.inter = impl, inter
        self.padded = impl._padded_intermediate_size(impl.moe_config)

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        from vllm._custom_ops import cpu_prepack_moe_weight

        return cpu_prepack_moe_weight(w.contiguous(), self.impl.isa)

    def pack_into(self, w: torch.Tensor, out: torch.Tensor) -> None:
        """Prepack expert rows `w` (n, R, C) into `out`, a contiguous tensor of the same shape."""
        torch.ops._C.prepack_moe_weight(w.contiguous(), out, self.impl.isa)

    def halves(self, hidden: int, dtype: torch.dtype) -> bool:
        """Whether [gate; up] may be prepacked half by half straight into a w13 row (no staging
        copy): the kernel packs blocks of output rows, so the halves pack alone as they do together
        when the intermediate size is not padded. Checked once per shape on random rows."""
        if self.padded != self.inter:
            return False
        return _halves_pack_alone(self.impl.isa, self.inter, hidden, dtype)


@functools.cache
def _halves_pack_alone(isa: str, inter: int, hidden: int, dtype: torch.dtype) -> bool:
    w = torch.randn(1, 2 * inter, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole, halves = torch.empty_like(w), torch.empty_like(w)
    torch.ops._C.prepack_moe_weight(w, whole, isa)
    torch.ops._C.prepack_moe_weight(w[:, :inter].contiguous(), halves[:, :inter], isa)
    torch.ops._C.prepack_moe_weight(w[:, inter:].contiguous(), halves[:, inter:], isa)
    return torch.equal(whole, halves)


def kernel_layout(routed_experts, w13_shape, w2_shape) -> _Prepack | None:
    """How slot rows in checkpoint layout, w13 (n, 2I, H) and w2 (n, H, I), reach the kernel: None
    when it reads that layout (rows are copied in place), a `_Prepack` on the CPU kernel. Refuses
    kernels whose layout slots cannot write."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from expertlib.errors import EngineError

    if not isinstance(routed_experts.quant_method, UnquantizedFusedMoEMethod):
        # quantized weights need their scales rewritten too; a plain cast would serve garbage
        raise EngineError(
            f"cannot write expert slots into quantized MoE weights ({type(routed_experts.quant_method).__name__})",
            hint="serve expert sets on an unquantized (bf16/fp16/fp32) base checkpoint",
        )
    kernel = getattr(routed_experts.quant_method, "moe_kernel", None)
    impl = getattr(kernel, "fused_experts", None)
    if isinstance(impl, CPUUnquantizedExperts):
        if getattr(impl, "_use_zentorch", False):
            return None
        return _Prepack(impl, w13_shape[1] // 2)
    # Only Triton reads w13/w2 in checkpoint layout; FlashInfer CUTLASS/TRT-LLM (picked on Blackwell)
    # swap halves or block-permute in place with the same shapes, and the TRT-LLM monolithic kernel
    # routes inside the kernel, skipping the slot remap: writing raw rows there would serve garbage.
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    if (
        isinstance(impl, TritonExperts)
        and tuple(w13_shape[1:]) == tuple(routed_experts.w13_weight.shape[1:])
        and tuple(w2_shape[1:]) == tuple(routed_experts.w2_weight.shape[1:])
    ):
        return None
    raise EngineError(
        f"cannot write expert slots for MoE kernel {type(impl).__name__} (weights {tuple(routed_experts.w13_weight.shape)})",
        hint="expert slots support unquantized MoE weights on the CPU and Triton kernels: "
        "start the engine with moe_backend='triton' (vLLM's --moe-backend triton)",
    )


def runtime_layout(routed_experts, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring rows in checkpoint layout, w13 (n, 2I, H) and w2 (n, H, I), into the kernel's layout.

    vLLM post-processes MoE weights after loading; on CPU the unquantized kernel pads the
    intermediate size and prepacks every expert (independently of the others) for its grouped GEMM,
    so a slot row written at run time must go through the same steps.
    """
    packer = kernel_layout(routed_experts, w13.shape, w2.shape)
    if packer is None:
        return w13, w2
    n, two_i, hidden = w13.shape
    inter, padded = two_i // 2, packer.padded
    if padded != inter:
        p13 = w13.new_zeros(n, 2 * padded, hidden)
        p13[:, :inter], p13[:, padded : padded + inter] = w13[:, :inter], w13[:, inter:]
        p2 = w2.new_zeros(n, hidden, padded)
        p2[:, :, :inter] = w2
        w13, w2 = p13, p2
    return packer.pack(w13), packer.pack(w2)


def _tp_shard(runner, w: ExpertWeights) -> ExpertWeights:
    """This rank's part of an expert under tensor parallelism, as vLLM's FusedMoE weight loader cuts
    it: gate/up rows (w1/w3 output dim) and down columns (w2 input dim) in contiguous chunks.
    Tested with tp=2 on the CPU backend (tests/test_vllm_tp.py); GPU tensor parallelism is not."""
    par = runner.moe_config.moe_parallel_config
    if par.use_ep:
        from expertlib.errors import EngineError

        raise EngineError(
            "expert slots do not support expert parallelism", hint="serve without --enable-expert-parallel"
        )
    if par.tp_size == 1:
        return w
    per = w.gate.shape[0] // par.tp_size
    rows = slice(par.tp_rank * per, (par.tp_rank + 1) * per)
    return ExpertWeights(
        gate=w.gate[rows],
        up=w.up[rows],
        down=w.down[:, rows],
        gate_bias=None if w.gate_bias is None else w.gate_bias[rows],
        up_bias=None if w.up_bias is None else w.up_bias[rows],
        down_bias=w.down_bias,  # expert biases: none of the slot architectures has them
    )


@dataclass
class LayerRows:
    """One layer's experts of a set in the kernel's final layout, in host memory (pinned when the
    slots are on a GPU): row i of each tensor is expert `experts[i]`, ready for one copy per part
    into a slot row."""

    experts: list[int]
    w13: torch.Tensor  # (n, 2P, H): [gate; up], P the kernel's (padded) intermediate size
    w2: torch.Tensor  # (n, H, P)
    b13: torch.Tensor | None = None  # (n, 2P) expert biases, where the architecture has them
    b2: torch.Tensor | None = None  # (n, H)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.parts())

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        """(name, rows) of every part it holds, named as `slot_parts` names the slot tensors."""
        named = (("w13", self.w13), ("w2", self.w2), ("b13", self.b13), ("b2", self.b2))
        return [(name, t) for name, t in named if t is not None]


@torch.no_grad()
def pack_rows(
    runner, experts: list[int], weights: list[ExpertWeights], reuse: LayerRows | None = None
) -> LayerRows:
    """Canonical experts (gate (I,H), up (I,H), down (H,I)) in the layout `runner`'s kernel reads
    (vLLM's w13 row is [w1; w3] = [gate; up]): this rank's shard, padded and prepacked on the CPU
    kernel. Each part is read once from the set's verified bytes and written once into the rows
    (prepacked straight into them where the halves of w13 pack alone). `reuse`: rows made before and
    no longer needed, whose memory is written again when it fits (fresh memory is slow to touch in a
    vLLM CPU worker)."""
    dst = runner.routed_experts
    weights = [_tp_shard(runner, w) for w in weights]
    n, (inter, hidden) = len(weights), weights[0].gate.shape
    packer = kernel_layout(dst, (n, 2 * inter, hidden), (n, hidden, inter))
    dtype, pin = dst.w13_weight.dtype, dst.w13_weight.device.type == "cuda"
    padded = inter if packer is None else packer.padded
    if (
        reuse is not None
        and reuse.w13.shape[0] >= n
        and tuple(reuse.w13.shape[1:]) == (2 * padded, hidden)
        and tuple(reuse.w2.shape[1:]) == (hidden, padded)
        and reuse.w13.dtype == dtype
        and not pin
    ):
        w13, w2 = reuse.w13[:n], reuse.w2[:n]
    else:
        w13 = torch.empty(n, 2 * padded, hidden, dtype=dtype, pin_memory=pin)  # (n, 2P, H)
        w2 = torch.empty(n, hidden, padded, dtype=dtype, pin_memory=pin)  # (n, H, P)
    _pack_into(packer, weights, [w13[i : i + 1] for i in range(n)], [w2[i : i + 1] for i in range(n)])
    rows = LayerRows(list(experts), w13, w2)
    bias13 = getattr(dst, "w13_bias", None)
    if weights[0].gate_bias is not None and isinstance(bias13, torch.Tensor):
        width = bias13.shape[-1] // 2
        rows.b13 = torch.zeros(n, 2 * width, dtype=bias13.dtype, pin_memory=pin)
        rows.b2 = torch.empty(n, dst.w2_bias.shape[-1], dtype=dst.w2_bias.dtype, pin_memory=pin)
        for i, w in enumerate(weights):
            k = w.gate_bias.numel()
            rows.b13[i, :k], rows.b13[i, width : width + k] = w.gate_bias, w.up_bias
            rows.b2[i].copy_(w.down_bias)
    return rows


@torch.no_grad()
def _pack_into(
    packer, weights: list[ExpertWeights], out13: list[torch.Tensor], out2: list[torch.Tensor]
) -> None:
    """Pack experts (this rank's shards) into destination rows: out13[i] (1, 2P, H), out2[i] (1, H, P),
    contiguous views (host-cache rows, or slot rows themselves)."""
    inter, hidden = weights[0].gate.shape
    padded = inter if packer is None else packer.padded
    dtype = out13[0].dtype
    halves = packer is not None and packer.halves(hidden, dtype)
    for w, o13, o2 in zip(weights, out13, out2, strict=True):
        gate, up, down = (t.to(dtype)[None] for t in (w.gate, w.up, w.down))  # (1, I, H), (1, H, I)
        if packer is None:
            o13[0, :inter].copy_(gate[0])
            o13[0, inter:].copy_(up[0])
            o2[0].copy_(down[0])
        elif halves:
            packer.pack_into(gate, o13[:, :inter])
            packer.pack_into(up, o13[:, inter:])
            packer.pack_into(down, o2)
        else:  # padded: staged in one zero-padded expert, then prepacked
            s13 = o13.new_zeros(1, 2 * padded, hidden)
            s13[:, :inter], s13[:, padded : padded + inter] = gate, up
            s2 = o2.new_zeros(1, hidden, padded)
            s2[:, :, :inter] = down
            packer.pack_into(s13, o13)
            packer.pack_into(s2, o2)


def _pack_spread(
    packer, weights: list[ExpertWeights], out13: list[torch.Tensor], out2: list[torch.Tensor]
) -> None:
    """`_pack_into`, the second half of the experts on the load helper thread meanwhile (each thread
    one core: two OpenMP teams of one, nothing spin-waits), for a load while no request runs."""
    from expertlib.vllm_plugin.hostcache import load_helper

    half = len(weights) // 2
    if half == 0:
        _pack_into(packer, weights, out13, out2)
        return
    other = load_helper().submit(_pack_into, packer, weights[half:], out13[half:], out2[half:])
    try:
        _pack_into(packer, weights[:half], out13[:half], out2[:half])
    finally:
        other.result()  # its error, if any, raised here; never left running past the load


@torch.no_grad()
def pack_into_slots(
    ctx, es, fills: list[list[int]], spread: bool = False, before_done: Callable[[], None] | None = None
) -> dict[int, LayerRows]:
    """Pack set `es` (checked; read or memory-mapped) straight into the slot rows `fills` names (every expert of
    the set, once each; CPU slots, no expert biases), then, the slots written, return copies of those
    rows for the host cache (`slots_written` is called between the two: a background load is done
    for the front end once the slots hold the set). Slot memory is faulted in already; packing into
    fresh host rows first costs their page faults too (0.215 s against 0.078 s per 144 MiB here), and
    so does the copy afterwards: it is made on the memory of the host-cache entries it replaces
    (`HostCache.make_room`, `HostCache.empty`), which the next load would otherwise wait for.
    `spread`: no request runs, both halves of each layer's experts packed at once (`_pack_spread`).
    `before_done()` runs before the load is done for the front end (it may raise to fail the load)."""
    from expertlib.vllm_plugin.hostcache import slots_written

    by_layer = fills_by_layer(ctx, fills)
    for layer, pairs in by_layer.items():
        pairs.sort(key=lambda pair: pair[1])  # by expert, as the host cache's rows are
        runner = ctx.layers[layer]
        dst = runner.routed_experts
        weights = [_tp_shard(runner, es.expert(layer, e)) for _, e in pairs]
        n, (inter, hidden) = len(weights), weights[0].gate.shape
        packer = kernel_layout(dst, (n, 2 * inter, hidden), (n, hidden, inter))
        out13 = [dst.w13_weight.data[p : p + 1] for p, _ in pairs]
        out2 = [dst.w2_weight.data[p : p + 1] for p, _ in pairs]
        (_pack_spread if spread else _pack_into)(packer, weights, out13, out2)
    if before_done is not None:
        before_done()
    slots_written()
    from expertlib.vllm_plugin.hostcache import HOST_CACHE

    HOST_CACHE.make_room(sum(len(pairs) * _row_bytes(ctx, layer) for layer, pairs in by_layer.items()))
    rows = {}
    for layer, pairs in by_layer.items():
        dst = ctx.layers[layer].routed_experts
        index = torch.tensor([p for p, _ in pairs])
        copies = []
        for part in (dst.w13_weight.data, dst.w2_weight.data):  # onto memory touched before, where kept
            out = HOST_CACHE.empty((len(pairs), *part.shape[1:]), part.dtype)
            copies.append(torch.index_select(part, 0, index, out=out))
        rows[layer] = LayerRows([e for _, e in pairs], *copies)
    return rows


def _row_bytes(ctx, layer: int) -> int:
    """One expert's bytes in `layer`'s slots, every part (`slot_parts`)."""
    return sum(t[0].numel() * t.element_size() for t in slot_parts(ctx.layers[layer].routed_experts).values())


def packs_into_slots(ctx, es, fills: list[list[int]]) -> bool:
    """Whether `pack_into_slots` can take this load: CPU slots, no expert biases, and the fills name
    every expert of the set once (none shared with a resident set's slot)."""
    first = next(iter(ctx.layers.values())).routed_experts
    pairs = sorted((int(layer), int(e)) for layer, _, e in fills)
    return (
        first.w13_weight.device.type == "cpu"
        and set(es.manifest.expert_shapes) == {"gate", "up", "down"}
        and pairs == sorted(es.manifest.pairs())
        and all(int(layer) in ctx.layers and 0 <= int(slot) < ctx.slots for layer, slot, _ in fills)
    )


@torch.no_grad()
def copy_rows(runner, physical_ids: list[int], rows: LayerRows, experts: list[int]) -> None:
    """Copy the packed rows of `experts` into physical expert rows `physical_ids` of one layer: one
    copy per part, the kernel's layout already (a memcpy on the calling thread on CPU). On a GPU the
    copies run on a side stream from pinned host memory (asynchronous to the forward steps, which
    never read these rows yet) and this returns once they are done."""
    dst = runner.routed_experts
    index = {e: i for i, e in enumerate(rows.experts)}
    pairs = [(dst.w13_weight, rows.w13), (dst.w2_weight, rows.w2)]
    if rows.b13 is not None:
        pairs += [(dst.w13_bias, rows.b13), (dst.w2_bias, rows.b2)]
    if dst.w13_weight.device.type == "cpu":
        for phys, e in zip(physical_ids, experts, strict=True):
            for target, src in pairs:
                row, packed = target.data[phys], src[index[e]]
                if row.is_contiguous() and packed.is_contiguous() and row.dtype == packed.dtype:
                    np.copyto(_bytes(row), _bytes(packed))
                else:
                    row.copy_(packed)
        return
    stream = torch.cuda.Stream(device=dst.w13_weight.device)
    with torch.cuda.stream(stream):
        for phys, e in zip(physical_ids, experts, strict=True):
            for target, src in pairs:
                target.data[phys].copy_(src[index[e]], non_blocking=True)
    stream.synchronize()


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a numpy array sharing its memory. numpy copies on the
    calling thread alone (and releases the GIL): a load's copies, made while forward steps run, then
    never start a second OpenMP thread team beside the steps' own."""
    return t.reshape(-1).view(torch.uint8).numpy()


def slot_parts(routed_experts) -> dict[str, torch.Tensor]:
    """The slot tensors of one layer by part name (the rows `LayerRows` holds per part)."""
    out = {"w13": routed_experts.w13_weight.data, "w2": routed_experts.w2_weight.data}
    for name, attr in (("b13", "w13_bias"), ("b2", "w2_bias")):
        t = getattr(routed_experts, attr, None)
        if isinstance(t, torch.Tensor):
            out[name] = t.data
    return out


def write_slots(runner, physical_ids: list[int], weights: list[ExpertWeights]) -> None:
    """Canonical experts into physical expert rows of one layer (`pack_rows`, then `copy_rows`)."""
    experts = list(range(len(weights)))
    copy_rows(runner, physical_ids, pack_rows(runner, experts, weights), experts)


def pack_set(ctx, es) -> dict[int, LayerRows]:
    """Every expert of set `es` (read and checked) in this worker's kernel layout: MoE layer ->
    rows. What the host cache keeps, so that loading the set again is one copy per part."""
    by_layer: dict[int, list[int]] = {}
    for layer, e in es.manifest.pairs():
        by_layer.setdefault(int(layer), []).append(int(e))
    out = {}
    for layer, experts in sorted(by_layer.items()):
        if layer not in ctx.layers:
            raise ValueError(f"the set replaces experts of layer {layer}, which is not a MoE layer here")
        experts.sort()
        out[layer] = pack_rows(ctx.layers[layer], experts, [es.expert(layer, e) for e in experts])
    return out


def fills_by_layer(ctx, fills: list[list[int]]) -> dict[int, list[tuple[int, int]]]:
    """`fills` = [[layer, slot, expert], ...] grouped per MoE layer as (physical row, expert), in their
    order; a slot out of range or a layer that is not a MoE layer here is a ValueError."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for layer, slot, expert in fills:
        if not 0 <= int(slot) < ctx.slots:
            raise ValueError(f"slot {slot} out of range (0..{ctx.slots - 1})")
        if int(layer) not in ctx.layers:
            raise ValueError(f"the set replaces experts of layer {layer}, which is not a MoE layer here")
        by_layer.setdefault(int(layer), []).append((ctx.num_experts + int(slot), int(expert)))
    return by_layer


def fill_slots(ctx, rows: dict[int, LayerRows], fills: list[list[int]]) -> None:
    """Copy packed rows into slots: fills = [[layer, slot, expert], ...]."""
    for layer, pairs in fills_by_layer(ctx, fills).items():
        copy_rows(ctx.layers[layer], [p for p, _ in pairs], rows[layer], [e for _, e in pairs])


# --- the packed-set disk cache (packcache.py) -------------------------------------------------------------

#: How `pack_rows` lays rows out; bump it whenever that changes, so packed-set cache entries written by
#: other code are never read (the kernel's own layout is covered by `layout_of`'s probes).
PACK_FORMAT = 1


def layout_of(ctx) -> str:
    """The digest of how this worker's slots take packed rows: `PACK_FORMAT`, the vLLM version, and
    per MoE layer its slot parts' dtypes and row shapes, its kernel, this rank's tensor-parallel place
    and the kernel's packing of fixed probe rows of those shapes. The packed-set cache's key hashes it
    with the set's content digest. Computed once per worker."""
    got = getattr(ctx, "_expertlib_pack_layout", None)
    if got is None:
        import vllm

        from expertlib.vllm_plugin.packcache import layout_digest

        layers = {str(layer): _layer_layout(runner) for layer, runner in sorted(ctx.layers.items())}
        got = layout_digest({"format": PACK_FORMAT, "vllm": vllm.__version__, "layers": layers})
        ctx._expertlib_pack_layout = got
    return got


def _layer_layout(runner) -> dict[str, Any]:
    dst = runner.routed_experts
    par = runner.moe_config.moe_parallel_config
    parts = {name: [str(t.dtype), list(t.shape[1:])] for name, t in slot_parts(dst).items()}
    w13, w2 = tuple(dst.w13_weight.shape[1:]), tuple(dst.w2_weight.shape[1:])
    packer = kernel_layout(dst, (1, *w13), (1, *w2))
    kernel = type(getattr(getattr(dst.quant_method, "moe_kernel", None), "fused_experts", None)).__name__
    probe = "checkpoint layout" if packer is None else _probe(packer.impl.isa, w13, w2, dst.w13_weight.dtype)
    return {
        "parts": parts,
        "kernel": kernel,
        "tp": [getattr(par, "tp_rank", 0), par.tp_size],
        "probe": probe,
    }


@functools.cache
def _probe(isa: str, w13: tuple[int, ...], w2: tuple[int, ...], dtype: torch.dtype) -> str:
    """The CPU kernel's packing of fixed random rows of these shapes, as a digest: another packing
    (kernel version, ISA, block sizes) gives another digest."""
    from expertlib.vllm_plugin.packcache import digest_rows

    g = torch.Generator().manual_seed(0)
    out = []
    for shape in (w13, w2):
        w = torch.randn(1, *shape, generator=g).to(dtype)
        packed = torch.empty_like(w)
        torch.ops._C.prepack_moe_weight(w, packed, isa)
        out.append(packed)
    return digest_rows(out)


def packed_layers(rows: dict[int, LayerRows]) -> list[tuple[int, list[int], list[tuple[str, torch.Tensor]]]]:
    """A packed set as the packed-set cache writes it."""
    return [(layer, r.experts, r.parts()) for layer, r in sorted(rows.items())]


def fill_from_packed(ctx, cache, content_digest: str, fills: list[list[int]]) -> bool:
    """Copy `fills` = [[layer, slot, expert], ...] of a set into their slots from the packed-set
    cache: on CPU its bytes read straight into the slot rows, on a GPU into pinned rows copied on a
    side stream (`copy_rows`). False when the cache has no usable entry (nothing trusted was written;
    the caller packs the set and writes every fill again)."""
    rec = cache.record(content_digest, layout_of(ctx))
    if rec is None:
        return False
    have = {(layer.layer, e): [p.name for p in layer.parts] for layer in rec.layers for e in layer.experts}
    targets, by_layer = [], {}
    for layer, pairs in fills_by_layer(ctx, fills).items():
        for phys, expert in pairs:
            names = have.get((layer, expert))
            if names is None or not {"w13", "w2"} <= set(names):
                cache.refuse(rec.key, f"it lacks expert {expert} of layer {layer}")
                return False
            by_layer.setdefault(layer, []).append((phys, expert, names))
    for layer, entries in by_layer.items():
        runner = ctx.layers[layer]
        parts = slot_parts(runner.routed_experts)
        if parts["w13"].device.type != "cpu":  # GPU slots: each layer staged in turn
            if not _fill_staged(runner, cache, rec, layer, entries):
                return False
            continue
        for phys, expert, names in entries:
            targets += [(layer, name, expert, parts[name][phys]) for name in names if name in parts]
    return cache.read_into(rec, targets)


def _fill_staged(runner, cache, rec, layer: int, entries) -> bool:
    """The GPU form of `fill_from_packed` for one layer: read into pinned rows, then `copy_rows`."""
    info = next(lay for lay in rec.layers if lay.layer == layer)
    experts = [e for _, e, _ in entries]
    dst = slot_parts(runner.routed_experts)
    staged = {
        p.name: torch.empty(len(experts), *p.row, dtype=dst[p.name].dtype, pin_memory=True)
        for p in info.parts
    }
    targets = [(layer, name, e, t[i]) for name, t in staged.items() for i, e in enumerate(experts)]
    if not cache.read_into(rec, targets):
        return False
    rows = LayerRows(experts, staged["w13"], staged["w2"], staged.get("b13"), staged.get("b2"))
    copy_rows(runner, [phys for phys, _, _ in entries], rows, experts)
    return True


def check_set_hook(model_runner) -> None:
    """Refuse a model runner that never calls the per-token set hook (batch.py): on it every request
    would silently get the base model. vLLM 0.32's V2 runner (its default wherever Triton is
    installed, so on every CUDA machine) has no `_init_model_kwargs`."""
    hook = getattr(type(model_runner), "_init_model_kwargs", None)
    if not getattr(hook, "_expertlib_hook", False):
        from expertlib.errors import EngineError

        cls = type(model_runner)
        raise EngineError(
            f"vLLM's model runner {cls.__module__}.{cls.__name__} does not pass per-request expert sets to the model",
            hint="use vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0 before the engine starts",
        )


def check_token_layout(ctx, parallel_config=None) -> None:
    """Refuse parallel layouts where a router's top-k rows are not this step's tokens in batch order,
    which is what the per-token set buffer holds: data/context/sequence-parallel MoE gathers other
    ranks' tokens before routing, micro-batching (DBO) routes a slice of the step at a time."""
    from expertlib.errors import EngineError

    for runner in ctx.layers.values():
        par = runner.moe_config.moe_parallel_config
        if par.dp_size > 1 or par.pcp_size > 1 or par.sp_size > 1:
            raise EngineError(
                f"expert slots do not support data/context/sequence-parallel MoE (dp {par.dp_size}, "
                f"pcp {par.pcp_size}, sp {par.sp_size}): routers would see other ranks' tokens",
                hint="serve with tensor parallelism only; run one engine per data-parallel replica",
            )
    if parallel_config is not None and getattr(parallel_config, "use_ubatching", False):
        raise EngineError(
            "expert slots do not support micro-batching (dual-batch overlap)",
            hint="serve without --enable-dbo / ubatch_size",
        )


class SlotWorkerExtension:
    """Methods added to every vLLM worker; call them with `collective_rpc("expertlib_...")`."""

    def _expertlib_ctx(self):
        ctx = getattr(self.model_runner.get_model(), "expertlib_slots", None)
        if ctx is None:
            raise RuntimeError("expertlib: the engine was not started with an expertlib slot architecture")
        return ctx

    def expertlib_info(self) -> dict[str, Any]:
        ctx = self._expertlib_ctx()
        check_set_hook(self.model_runner)
        check_token_layout(ctx, getattr(getattr(self, "vllm_config", None), "parallel_config", None))
        first = next(iter(ctx.layers.values())).routed_experts
        if first.w13_weight.device.type != "cpu":  # refuse a kernel slots cannot write now, not at a load
            runtime_layout(first, first.w13_weight[:1], first.w2_weight[:1])
        return {
            "num_experts": ctx.num_experts,
            "slots": ctx.slots,
            "max_sets": ctx.max_sets,
            "moe_layers": sorted(ctx.layers),
            "dtype": str(first.w13_weight.dtype).removeprefix("torch."),
            "device": str(first.w13_weight.device),
            "weight_absmax": ctx.expert_absmax(),  # the weight bound's base statistics (expertlib.bounds)
        }

    def _expertlib_rows(self, path: str, content_digest: str | None, checked: str | None):
        """The set at `path` packed for this worker's slots, from the host cache or read from the
        file once and checked (content digest, per-expert digests, finiteness) before anything is
        made of it, unless `checked` (the front end's VerifiedRecord, JSON) covers the unchanged file.
        What is packed anew is also written to the packed-set disk cache (in the background)."""
        from expertlib.verify import VerifiedRecord
        from expertlib.vllm_plugin.hostcache import HOST_CACHE
        from expertlib.vllm_plugin.packcache import PACKED_CACHE

        ctx = self._expertlib_ctx()
        record = VerifiedRecord.model_validate_json(checked) if checked else None
        return HOST_CACHE.entry(
            path,
            content_digest,
            record,
            prepare=lambda es: pack_set(ctx, es),
            size=lambda rows: sum(r.nbytes for r in rows.values()),
            made=lambda digest, rows: PACKED_CACHE.save_later(digest, layout_of(ctx), packed_layers(rows)),
        )

    def _expertlib_fill(
        self,
        path: str,
        fills: list[list[int]],
        content_digest: str | None,
        checked: str | None,
        spread: bool = False,
    ) -> None:
        """Copy `fills` of the set at `path` into their slots: from the host cache when it holds the
        set, else from the packed-set disk cache (its bytes read straight into the slots), else read,
        checked and packed (`_expertlib_rows`). `spread`: no request runs (`pack_into_slots`)."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE
        from expertlib.vllm_plugin.packcache import PACKED_CACHE

        ctx = self._expertlib_ctx()
        cached = HOST_CACHE.holds(path, content_digest)
        if (
            fills
            and content_digest
            and not cached
            and fill_from_packed(ctx, PACKED_CACHE, content_digest, fills)
        ):
            return
        if (
            fills
            and not cached
            and self._expertlib_pack_into_slots(path, fills, content_digest, checked, spread)
        ):
            return
        rows = self._expertlib_rows(path, content_digest, checked)
        if fills:
            fill_slots(ctx, rows, fills)

    def _expertlib_pack_into_slots(
        self,
        path: str,
        fills: list[list[int]],
        content_digest: str | None,
        checked: str | None,
        spread: bool = False,
    ) -> bool:
        """A set neither cache holds: checked as `_expertlib_rows` checks it, memory-mapped (no read
        into a buffer) and packed from the map straight into its slots (`pack_into_slots`); then, the
        load done for the front end, copies of those rows kept in the host cache and written to the
        packed-set cache. False when the load does not qualify (`packs_into_slots`)."""
        import logging

        from expertlib.errors import DigestMismatchError
        from expertlib.patch import ExpertSet
        from expertlib.verify import VerifiedRecord
        from expertlib.vllm_plugin.hostcache import HOST_CACHE
        from expertlib.vllm_plugin.packcache import PACKED_CACHE

        ctx = self._expertlib_ctx()
        es = ExpertSet.open(path)
        if not packs_into_slots(ctx, es, fills):
            return False
        if checked:
            es.trust(VerifiedRecord.model_validate_json(checked))
        # checked unless the front end's check stands, then packed straight from a memory map of the
        # (page-cached) file: no read into a buffer (0.03-0.10 s per 144 MiB in a vLLM worker)
        state = es.map_verified()
        digest = es.manifest.content_digest
        if content_digest is not None and digest != content_digest:
            raise DigestMismatchError("the set file changed after it was checked", path=path)
        # the map shows later writes: what was packed must be what was checked
        unchanged = functools.partial(es.still_as_mapped, state, "loaded")
        rows = pack_into_slots(ctx, es, fills, spread, before_done=unchanged)
        del es, unchanged  # the map
        try:  # the slots hold the set: from here on nothing may fail the load
            HOST_CACHE.keep(path, digest, rows, sum(r.nbytes for r in rows.values()))
            PACKED_CACHE.save_later(digest, layout_of(ctx), packed_layers(rows))
        except Exception as exc:
            logging.getLogger(__name__).warning("could not keep a copy of set %s: %s", path, exc)
        return True

    def expertlib_write_slots(
        self, path: str, fills: list[list[int]], content_digest: str | None = None, checked: str | None = None
    ) -> int:
        """Copy experts of the set file at `path` into slots now: fills = [[layer, slot, expert], ...]
        (what `expertlib_stage` does with fills, inline), once no load job is still running."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE

        HOST_CACHE.wait_idle()
        self._expertlib_fill(path, [[int(v) for v in f] for f in fills], content_digest, checked)
        return len(fills)

    def expertlib_stage(
        self,
        path: str,
        content_digest: str | None = None,
        checked: str | None = None,
        background: bool = False,
        fills: list[list[int]] | None = None,
        wait: float = 0.0,
    ) -> bool:
        """Have the set file at `path` read, checked and packed in host memory (the host cache), and
        copy `fills` = [[layer, slot, expert], ...] of it into their slots, which no set row may
        reference yet. `background`: on a thread while forward steps go on, False until it is done
        (poll again with the same arguments); `wait`: seconds this call may block for it first (at
        most 1; the front end asks only while no request runs). See `HostCache.stage`."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE

        fills = [[int(v) for v in f] for f in fills or []]
        idle = float(wait) > 0  # the front end waits only while no request runs: the job may spread

        def work() -> None:
            self._expertlib_fill(path, fills, content_digest, checked, idle)

        key = (str(path), content_digest, tuple(map(tuple, fills)))
        return HOST_CACHE.stage(key, work, bool(background), max(0.0, min(float(wait), 1.0)))

    def expertlib_unstage(self, path: str) -> dict[str, Any]:
        """The load of `path` is over (done or failed); returns the host cache's status after it
        (`expertlib_host_cache`'s)."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE

        HOST_CACHE.unstage(path)
        return self.expertlib_host_cache()

    def expertlib_prepack(
        self, path: str, content_digest: str, checked: str | None = None, finish: bool = False
    ) -> dict[str, Any]:
        """Pack the set at `path` ahead of its first request into the packed-set disk cache, one small
        piece per call on a thread of its own (`prepack.py`): call again to run the next piece once
        "running" is False, until "done"; `finish`: drop the job (abandoned when not done)."""
        from expertlib.vllm_plugin.packcache import PACKED_CACHE
        from expertlib.vllm_plugin.prepack import PREPACK, pack_pieces

        ctx = self._expertlib_ctx()
        key = (str(path), content_digest)
        if finish:
            PREPACK.finish(key)
            return {"done": True}
        layout = layout_of(ctx)

        def pieces():
            return pack_pieces(
                ctx,
                PACKED_CACHE,
                path,
                content_digest,
                checked,
                layout=layout,
                pack_rows=pack_rows,
                row_bytes=functools.partial(_row_bytes, ctx),
            )

        return PREPACK.advance(key, pieces)

    def expertlib_set_row(self, set_row: int, remap: dict[Any, dict[Any, int]]) -> None:
        """Make set row `set_row` the identity except remap[layer][expert] = slot (a slot index, as in
        `Placement.remap`; the table the router reads holds the physical id E + slot)."""
        ctx = self._expertlib_ctx()
        if not 1 <= set_row <= ctx.max_sets:
            raise ValueError(f"set row {set_row} out of range (1..{ctx.max_sets})")
        table = torch.arange(ctx.num_experts, dtype=ctx.remap.dtype).repeat(ctx.remap.shape[0], 1)  # (L, E)
        for layer, mapping in remap.items():
            for expert, slot in mapping.items():
                if not 0 <= int(slot) < ctx.slots:
                    raise ValueError(f"slot {slot} out of range (0..{ctx.slots - 1})")
                table[int(layer), int(expert)] = ctx.num_experts + int(slot)
        ctx.remap[:, set_row].copy_(table.to(ctx.remap.device))

    def expertlib_take_routing(self, row: int) -> dict[int, list[float]]:
        """The prompt routing counted for capture row `row` (`model="auto"`), zeroed after reading."""
        from expertlib.vllm_plugin import CAPTURE_ROWS

        if not 1 <= row <= CAPTURE_ROWS:
            raise ValueError(f"capture row {row} out of range (1..{CAPTURE_ROWS})")
        return self._expertlib_ctx().take_routing(row)

    def expertlib_clear_row(self, set_row: int) -> None:
        self.expertlib_set_row(set_row, {})

    def expertlib_host_cache(self, budget: int | None = None) -> dict[str, Any]:
        """Resize this worker's host cache of recent sets (bytes) and report what it holds, with the
        packed-set disk cache's figures under "packed"."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE
        from expertlib.vllm_plugin.packcache import PACKED_CACHE

        if budget is not None:
            HOST_CACHE.resize(budget)
        return dict(HOST_CACHE.status(), packed=PACKED_CACHE.status())

    def expertlib_packed_cache(
        self,
        budget: int | None = None,
        root: str | None = None,
        flush: bool = False,
        enabled: bool | None = None,
    ) -> dict[str, Any]:
        """Bound (bytes, 0 = off: its entries removed) or move this worker's packed-set disk cache;
        `flush`: wait for its pending writes first (those of a load whose job still runs included);
        `enabled=False`: this worker neither reads nor writes it (entries kept for other processes).
        Reports its figures."""
        from expertlib.vllm_plugin.hostcache import HOST_CACHE
        from expertlib.vllm_plugin.packcache import PACKED_CACHE

        if flush:
            HOST_CACHE.wait_idle()  # a load's tail asks for its write at its end
            PACKED_CACHE.flush()
        if enabled is not None:
            PACKED_CACHE.enabled = bool(enabled)
        if budget is not None or root is not None:
            PACKED_CACHE.configure(root, budget)
        return PACKED_CACHE.status()

    def expertlib_apply(
        self,
        clear_rows: list[int],
        path: str | None = None,
        fills: list[list[int]] | None = None,
        set_row: int | None = None,
        remap: dict[Any, dict[Any, int]] | None = None,
        content_digest: str | None = None,
        checked: str | None = None,
    ) -> None:
        """One placement in one call (so between two forward steps): copy the new set's experts into
        their slots (checked first: a refused set changes nothing), clear the rows of evicted or
        unloaded sets, then write its remap row."""
        if fills:
            assert path is not None
            self.expertlib_write_slots(path, fills, content_digest, checked)
        for r in clear_rows:
            self.expertlib_clear_row(int(r))
        if set_row is not None:
            self.expertlib_set_row(int(set_row), remap or {})
