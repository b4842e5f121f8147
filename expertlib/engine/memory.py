"""How much memory an engine takes: the KV cache sized to fit this machine, and start-up failures
caused by memory turned into one error with the numbers and the flags to change.

`size_memory` runs before vLLM starts (both engines, `expertlib.engine.start`); the arithmetic lives
in `expertlib.sizing`, which this module applies to vLLM's arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any

from expertlib.checkpoint import BaseCheckpoint
from expertlib.errors import EngineError, MemoryBudgetError

log = logging.getLogger("expertlib.engine")


#: Sequences the CPU KV cache is sized for when max_num_seqs is not given (vLLM's server default on CPU).
CPU_MAX_NUM_SEQS = 128


def on_cpu() -> bool:
    """Whether vLLM runs on CPUs here (its platform), which decides how memory is sized."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def size_memory(base: BaseCheckpoint, slots: int, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Engine kwargs with memory settings that fit this machine, and one line saying what was chosen.

    CPU: the KV cache is sized from the model, max_model_len and max_num_seqs (`expertlib.sizing`)
    and passed as vLLM's `kv_cache_memory_bytes`, which the CPU worker honours, instead of vLLM's
    default of 0.92 of the NUMA node; a context too long for the memory is shortened when the caller
    gave none. `VLLM_CPU_KVCACHE_SPACE` in the environment still wins (vLLM reads it). GPU: vLLM's
    gpu_memory_utilization stays; the weights plus the slots must leave room for a KV cache in it."""
    from expertlib import sizing

    kw = dict(kwargs)
    dims = sizing.ServingSizes.of(base, kw.get("dtype"))
    slot_bytes = slots * dims.slot_row_bytes
    if not on_cpu():
        tp, pp = int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1)
        devices = sizing.gpu_memory(tp * pp)  # NVML: no CUDA context in this (the API) process
        util = float(kw.get("gpu_memory_utilization", 0.9))
        sizing.check_gpu_fit(
            dims,
            slot_bytes=slot_bytes,
            devices=devices,
            utilization=util,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
        )
        total = devices[0][1]
        ranks = f" on each of {tp * pp} GPUs" if tp * pp > 1 else ""
        line = f"GPU memory: {util} of {sizing.format_bytes(total)}{ranks}; weights {sizing.format_bytes(dims.weights_bytes)}, "
        return kw, line + f"expert slots {sizing.format_bytes(slot_bytes)} in all, the rest is KV cache"
    if sizing.cpu_kv_env_set():
        kw.pop("kv_cache_memory_bytes", None)  # vLLM replaces it by the variable anyway
        value = os.environ[sizing.CPU_KV_ENV]
        return (
            kw,
            f"KV cache: {sizing.CPU_KV_ENV}={value} GiB from the environment (unset it to size it here)",
        )
    given = kw.get("kv_cache_memory_bytes")
    available = sizing.available_memory()
    max_len = int(kw.get("max_model_len") or dims.max_position or 2048)
    if kw.get("max_model_len") is None and given is None:
        fit = sizing.fit_max_model_len(dims, max_len, slot_bytes=slot_bytes, available=available)
        if 0 < fit < max_len:
            log.warning("context shortened to %d tokens so that the KV cache fits memory", fit)
            kw["max_model_len"] = max_len = fit
    plan = sizing.plan_kv_cache(
        dims,
        max_model_len=max_len,
        max_num_seqs=int(kw.get("max_num_seqs") or CPU_MAX_NUM_SEQS),
        slot_bytes=slot_bytes,
        available=available,
        kv_cache_memory=None if given is None else int(given),
    )
    kw["kv_cache_memory_bytes"] = plan.kv_bytes
    return kw, plan.describe()


_MEMORY_WORDS = re.compile(r"memory|kv cache|out of memory", re.I)


@contextlib.contextmanager
def memory_errors(plan: str):
    """Start-up failures caused by memory become one MemoryBudgetError line with the numbers and flags."""
    try:
        yield
    except MemoryBudgetError:
        raise
    except Exception as exc:
        chain, e = [], exc
        while e is not None and len(chain) < 5:
            chain.append(e)
            e = e.__cause__ or e.__context__
        hit = next((str(x) for x in chain if _MEMORY_WORDS.search(str(x))), None)
        if hit is None and "initialization failed" in str(exc):  # engine core in its own process
            raise EngineError(
                f"the vLLM engine failed to start (its error is in the log above) [{plan}]",
                hint="if that error is about memory, pass --kv-cache-memory SIZE, a smaller --max-model-len "
                "or fewer --slots",
            ) from exc
        if hit is None:
            raise
        first = " ".join(hit.split())
        first = first if len(first) <= 240 else first[:237] + "..."
        raise MemoryBudgetError(
            f"the engine did not fit in memory: {first} [{plan}]",
            hint="pass --kv-cache-memory SIZE, a smaller --max-model-len, or fewer --slots",
        ) from exc


__all__ = ["CPU_MAX_NUM_SEQS", "memory_errors", "on_cpu", "size_memory"]
