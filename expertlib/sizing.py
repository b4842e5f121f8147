"""How big the serving engine's memory pieces are: KV cache, expert slots, host cache of sets.

    dims = ServingSizes.of(BaseCheckpoint("./base"), dtype="float32")
    slots = plan_slots(dims, named={"math@1": {3: [1, 5]}}, registered=[...])   # --slots auto
    kv = plan_kv_cache(dims, max_model_len=2048, max_num_seqs=16, slot_bytes=slots.slot_bytes)

Everything here is arithmetic over the base's config and the expert maps of the sets (read from
the registry or the patch manifests, never from the tensors), so it runs before any engine starts
and refuses, with the numbers and the flag to change, what cannot fit. `expertlib.engine` turns the
plans into vLLM engine arguments (`kv_cache_memory_bytes` on CPU, slot counts through hf_overrides).
"""

from __future__ import annotations

import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from expertlib.errors import MemoryBudgetError, SlotError

GiB = 1024**3
MiB = 1024**2
#: Slots and remap rows used when nothing tells us better (no sets named, no memory budget).
DEFAULT_SLOTS = 8
DEFAULT_MAX_SETS = 8
#: The legacy vLLM CPU variable; when a user sets it, vLLM's value wins and we size nothing.
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
#: Share of the free host memory (after weights and slots) the automatic KV cache may take on CPU.
KV_SHARE = 0.5
#: Memory kept free for the process itself (activations, Python, tokenizer) on CPU.
CPU_RESERVE = 1 * GiB
#: Tokens per KV block on vLLM's CPU backend (MLA uses larger blocks; we round up to this).
KV_BLOCK = 256
#: Default host-memory budget for recently used expert sets (the second-level cache).
HOST_CACHE_SHARE = 0.1
HOST_CACHE_MAX = 4 * GiB

ExpertMap = Mapping[int, Iterable[int]]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str | int | float) -> int:
    """Bytes from `4GiB`, `512MiB`, `1.5GB`, `2G` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; use e.g. 4GiB, 512MiB or 2GB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """How every size is printed: `512 B`, `1.5 KiB`, `12.3 MiB`, `1.25 GiB`, `2.00 TiB`."""
    for unit, scale, digits in (("TiB", 1024**4, 2), ("GiB", GiB, 2), ("MiB", MiB, 1), ("KiB", 1024, 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


# --- the base model ------------------------------------------------------------------------------


_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


def dtype_bytes(dtype: Any, default: int = 2) -> int:
    name = str(dtype).removeprefix("torch.").lower() if dtype is not None else ""
    return _DTYPE_BYTES.get(name, default)


@dataclass(frozen=True)
class ServingSizes:
    """A base's `ModelShape` in bytes at the serving dtype, and its checkpoint's size: per-token KV,
    one routed expert, the weights."""

    kv_bytes_per_token: int
    expert_bytes: int  # one routed expert (gate, up, down) in the serving dtype
    moe_layers: int
    num_experts: int
    weights_bytes: int  # the checkpoint's tensors in the serving dtype
    max_position: int | None

    @property
    def slot_row_bytes(self) -> int:
        """One slot in every MoE layer."""
        return self.expert_bytes * self.moe_layers

    @classmethod
    def of(cls, base: Any, dtype: Any = None) -> ServingSizes:
        """From a `BaseCheckpoint` (its config's shape plus the safetensors files' sizes; no tensor is read)."""
        from expertlib.shape import ModelShape

        cfg = base.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        ckpt_dtype = getattr(text, "torch_dtype", None) or getattr(text, "dtype", None)
        width = dtype_bytes(dtype if dtype not in (None, "auto") else ckpt_dtype, default=2)
        stored = dtype_bytes(ckpt_dtype, default=width)
        shape = ModelShape.from_config(text)
        return cls(
            kv_bytes_per_token=shape.kv_per_token * width,
            expert_bytes=shape.params_per_expert * width,
            moe_layers=len(shape.moe_layers),
            num_experts=shape.num_experts,
            weights_bytes=int(_checkpoint_bytes(base.path) * width / stored),
            max_position=shape.max_position,
        )


def _checkpoint_bytes(path: Any) -> int:
    from pathlib import Path

    files = list(Path(path).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


# --- slots --------------------------------------------------------------------------------------------


def per_layer_demand(maps: Iterable[ExpertMap]) -> dict[int, int]:
    """Slots each MoE layer needs to hold all these sets at once (no dedup assumed)."""
    out: dict[int, int] = {}
    for m in maps:
        for layer, ids in m.items():
            out[int(layer)] = out.get(int(layer), 0) + len(list(ids))
    return out


def set_width(m: ExpertMap) -> int:
    """A set's largest per-layer expert count: the slots per layer it needs on its own."""
    return max((len(list(ids)) for ids in m.values()), default=0)


@dataclass(frozen=True)
class SlotPlan:
    """Expert slots per MoE layer and remap rows (resident sets) for one engine, and why."""

    slots: int
    max_sets: int
    slot_bytes: int  # all slots, all layers
    need: int  # slots per layer the named sets take together (their fullest layer)
    named: int  # sets named at start
    typical: int  # per-layer width of a typical registered set (0: none known)
    source: str  # "sets", "memory", "given" or "default"
    extra: int = field(default=0)  # more typical sets that fit beside the named ones

    def describe(self) -> str:
        line = (
            f"expert slots: {self.slots} per MoE layer ({format_bytes(self.slot_bytes)}), up to {self.max_sets} sets "
            f"resident; the {self.named} named set(s) need {self.need} per layer"
        )
        if self.typical:
            line += f", room for {self.extra} more set(s) of typical size ({self.typical} experts per layer)"
        return line


def plan_slots(
    dims: ServingSizes,
    named: Mapping[str, ExpertMap],
    registered: Iterable[ExpertMap] = (),
    *,
    slots: int | str | None = "auto",
    max_sets: int | None = None,
    expert_memory: int | None = None,
) -> SlotPlan:
    """`--slots auto`: the named sets' largest per-layer demand plus one typical set of headroom, or
    `expert_memory` divided by one slot's size in every layer; a given number is checked. Raises
    SlotError (with the numbers) when the named sets cannot all be resident at once."""
    maps = list(named.values())
    demand = per_layer_demand(maps)
    need = max(demand.values(), default=0)
    widths = [w for w in (set_width(m) for m in [*maps, *registered]) if w]
    typical = int(math.ceil(statistics.median(widths))) if widths else 0
    row = max(dims.slot_row_bytes, 1)
    if slots not in (None, "auto"):
        n, source = int(slots), "given"
    elif expert_memory is not None:
        n, source = int(expert_memory // row), "memory"
    elif maps:
        n, source = need + max(typical, 1), "sets"
    else:
        n, source = max(DEFAULT_SLOTS, 2 * typical), "default"
    if n < 1:
        raise SlotError(
            f"--expert-memory {format_bytes(expert_memory or 0)} holds no expert slot: one slot in all "
            f"{dims.moe_layers} MoE layers takes {format_bytes(row)}",
            hint=f"pass --expert-memory of at least {format_bytes(row)}",
        )
    if need > n:
        flag = "--expert-memory" if source == "memory" else "--slots"
        fullest = max(demand, key=lambda layer: demand[layer])
        raise SlotError(
            f"the {len(maps)} expert sets named at start need {need} slots in MoE layer {fullest} "
            f"({format_bytes(need * row)} in all layers) but {flag} gives {n} ({format_bytes(n * row)}); start-up never evicts "
            "a set it was asked to load",
            hint=f"pass --slots auto, --slots {need} or more, or name fewer sets",
        )
    rows = max(DEFAULT_MAX_SETS, len(maps) + max(1, (n - need) // max(typical, 1)))
    if max_sets is not None:
        if max_sets < len(maps):
            raise SlotError(
                f"{len(maps)} expert sets are named at start but --max-sets is {max_sets}",
                hint=f"pass --max-sets {len(maps)} or more (or leave it out)",
            )
        rows = max_sets
    extra = (n - need) // typical if typical else 0
    return SlotPlan(n, rows, n * row, need, len(maps), typical, source, extra)


# --- KV cache -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVPlan:
    """The KV cache an engine gets (bytes), and the numbers it came from."""

    kv_bytes: int
    max_model_len: int
    max_num_seqs: int
    full: int  # bytes for max_num_seqs sequences of max_model_len tokens
    available: int  # free host memory when sized
    weights: int
    slots: int
    given: bool = False  # --kv-cache-memory

    @property
    def sequences(self) -> float:
        """Full-length sequences the cache holds at once."""
        one = self.full / max(self.max_num_seqs, 1)
        return self.kv_bytes / one if one else 0.0

    def describe(self) -> str:
        how = "as given" if self.given else "sized from the model"
        return (
            f"KV cache: {format_bytes(self.kv_bytes)} ({how}; {self.sequences:.1f} sequences of {self.max_model_len} "
            f"tokens; weights {format_bytes(self.weights)}, expert slots {format_bytes(self.slots)}, {format_bytes(self.available)} free)"
        )


def _round_up(tokens: int, block: int = KV_BLOCK) -> int:
    return -(-tokens // block) * block


def plan_kv_cache(
    dims: ServingSizes,
    *,
    max_model_len: int,
    max_num_seqs: int,
    slot_bytes: int,
    available: int,
    kv_cache_memory: int | None = None,
) -> KVPlan:
    """The CPU KV cache: room for `max_num_seqs` full-length sequences, capped at KV_SHARE of the host
    memory left after weights, slots and a reserve; never less than one full sequence. Raises
    MemoryBudgetError (one line: numbers and flag) when even one sequence does not fit."""
    per_seq = _round_up(max_model_len) * dims.kv_bytes_per_token
    full = per_seq * max_num_seqs
    base = dict(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        full=full,
        available=available,
        weights=dims.weights_bytes,
        slots=slot_bytes,
    )
    room = available - dims.weights_bytes - slot_bytes - CPU_RESERVE
    if kv_cache_memory is not None:
        if kv_cache_memory < per_seq:
            raise MemoryBudgetError(
                f"--kv-cache-memory {format_bytes(kv_cache_memory)} is less than one {max_model_len}-token sequence "
                f"needs ({format_bytes(per_seq)})",
                hint=f"pass --kv-cache-memory {format_bytes(per_seq)} or more, or a smaller --max-model-len",
            )
        if kv_cache_memory > available - dims.weights_bytes - slot_bytes:
            raise MemoryBudgetError(
                f"--kv-cache-memory {format_bytes(kv_cache_memory)} plus weights {format_bytes(dims.weights_bytes)} and expert "
                f"slots {format_bytes(slot_bytes)} exceed the {format_bytes(available)} of free memory",
                hint="pass a smaller --kv-cache-memory, fewer --slots, or free memory",
            )
        return KVPlan(kv_cache_memory, given=True, **base)
    kv = min(full, int(max(room, 0) * KV_SHARE))
    if kv < per_seq:
        if room >= per_seq:
            kv = per_seq
        else:
            raise MemoryBudgetError(
                f"not enough memory: one {max_model_len}-token sequence needs {format_bytes(per_seq)} of KV cache, but "
                f"only {format_bytes(max(room, 0))} is left of {format_bytes(available)} free after weights "
                f"({format_bytes(dims.weights_bytes)}), expert slots ({format_bytes(slot_bytes)}) and {format_bytes(CPU_RESERVE)} reserve",
                hint="pass a smaller --max-model-len, fewer --slots / --expert-memory, or free memory",
            )
    kv = max(dims.kv_bytes_per_token * KV_BLOCK, kv // dims.kv_bytes_per_token * dims.kv_bytes_per_token)
    return KVPlan(kv, **base)


def fit_max_model_len(dims: ServingSizes, want: int, *, slot_bytes: int, available: int) -> int:
    """The longest context (whole KV blocks, at most `want`) whose one sequence fits the automatic
    KV share of the memory left after weights, slots and the reserve (0: not even one block)."""
    room = available - dims.weights_bytes - slot_bytes - CPU_RESERVE
    tokens = int(max(room, 0) * KV_SHARE) // max(dims.kv_bytes_per_token, 1)
    return min(want, tokens // KV_BLOCK * KV_BLOCK)


def check_gpu_fit(
    dims: ServingSizes,
    *,
    slot_bytes: int,
    utilization: float,
    devices: Sequence[tuple[int, int]] | None = None,
    total: int | None = None,
    free: int | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> None:
    """On GPUs vLLM sizes the KV cache itself within `utilization` of each device; every rank's share
    of the weights and the slots must leave room for it there. `devices` are (free, total) bytes of
    the visible GPUs in order (rank r runs on device r); `total`/`free` describe a single GPU.
    Tensor parallelism splits every weight and slot row, pipeline parallelism splits the layers, so
    each of the tp x pp ranks holds 1/(tp x pp) of both (embeddings too: vLLM shards the vocabulary).
    MemoryBudgetError (one line, naming the GPU) otherwise."""
    if devices is None:
        if total is None:
            raise ValueError("check_gpu_fit needs devices or total")
        devices = [(total if free is None else free, total)]
        free_known = free is not None
    else:
        free_known = True
    ranks = max(int(tensor_parallel_size), 1) * max(int(pipeline_parallel_size), 1)
    if len(devices) < ranks:
        raise MemoryBudgetError(
            f"tensor_parallel_size {tensor_parallel_size} x pipeline_parallel_size {pipeline_parallel_size} "
            f"needs {ranks} GPUs but {len(devices)} are visible",
            hint="make more GPUs visible (CUDA_VISIBLE_DEVICES) or pass a smaller tensor_parallel_size",
        )
    weights, slots = -(-dims.weights_bytes // ranks), -(-slot_bytes // ranks)
    per_rank = f" per GPU ({ranks} ranks)" if ranks > 1 else ""
    for index, (dev_free, dev_total) in enumerate(devices[:ranks]):
        budget = int(dev_total * utilization)
        gpu = f"GPU {index}" if len(devices) > 1 or ranks > 1 else "the GPU"
        if weights + slots >= budget:
            hint = (
                "pass fewer --slots / a smaller --expert-memory, or --engine-arg gpu_memory_utilization=0.95"
            )
            if ranks == 1 and len(devices) > 1:
                hint += f", or spread the model with --engine-arg tensor_parallel_size={len(devices)}"
            raise MemoryBudgetError(
                f"weights {format_bytes(weights)} plus expert slots {format_bytes(slots)}{per_rank} leave no KV cache within "
                f"gpu_memory_utilization {utilization} of {gpu} ({format_bytes(dev_total)})",
                hint=hint,
            )
        if free_known and budget > dev_free:
            raise MemoryBudgetError(
                f"gpu_memory_utilization {utilization} asks for {format_bytes(budget)} but only {format_bytes(dev_free)} of "
                f"{format_bytes(dev_total)} is free on {gpu}",
                hint=f"pass --engine-arg gpu_memory_utilization={max(dev_free / dev_total - 0.02, 0.05):.2f}",
            )


def gpu_memory(count: int) -> list[tuple[int, int]]:
    """(free, total) bytes of the first `count` visible GPUs, without creating a CUDA context in this
    process (one would take ~0.5 GiB of GPU 0 and make vLLM spawn its workers): through NVML (the
    module vLLM ships), else from a short-lived child process."""
    try:
        from vllm.platforms import current_platform
        from vllm.utils.import_utils import import_pynvml

        nvml = import_pynvml()
        nvml.nvmlInit()
        try:
            out = []
            for i in range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(current_platform.device_id_to_physical_device_id(i))
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                out.append((int(info.free), int(info.total)))
            return out
        finally:
            nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (another vendor, no driver library): ask a child process
        import json
        import subprocess
        import sys

        code = (
            f"import json, torch; n = min({int(count)}, torch.cuda.device_count()); "
            "print(json.dumps([list(torch.cuda.mem_get_info(i)) for i in range(n)]))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise MemoryBudgetError(
                f"could not read the GPUs' memory: {res.stderr.strip().splitlines()[-1:] or res.returncode}",
                hint="check that the NVIDIA driver works (nvidia-smi)",
            ) from None
        return [(int(f), int(t)) for f, t in json.loads(res.stdout.strip().splitlines()[-1])]


# --- host memory --------------------------------------------------------------------------------------


def available_memory() -> int:
    """Free memory where the CPU engine allocates: its NUMA node (vLLM's own reading), else the host's."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_allowed_cpu_list()[0].numa_node
        return int(get_memory_node_info(node).available_memory)
    except Exception:  # noqa: BLE001 - vLLM missing or no NUMA information: the host's figure
        import psutil

        return int(psutil.virtual_memory().available)


def host_cache_budget(available: int) -> int:
    """Default size of the host cache of recently used sets: a tenth of free memory, at most 4 GiB."""
    return int(min(HOST_CACHE_MAX, available * HOST_CACHE_SHARE))


def cpu_kv_env_set() -> bool:
    return os.environ.get(CPU_KV_ENV, "") != ""


__all__ = [
    "KVPlan",
    "ServingSizes",
    "SlotPlan",
    "available_memory",
    "check_gpu_fit",
    "fit_max_model_len",
    "format_bytes",
    "gpu_memory",
    "host_cache_budget",
    "parse_size",
    "per_layer_demand",
    "plan_kv_cache",
    "plan_slots",
]
