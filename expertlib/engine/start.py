"""What starting an engine takes, the same for the offline and the async engine: the base folder,
the engine's own options taken out of vLLM's, the memory sized (`expertlib.engine.memory`) and vLLM's
arguments for a model with expert slots.

    start = EngineStart.of("path/to/base", slots=8, max_sets=8, engine_kwargs={"enforce_eager": True})
    with memory_errors(start.memory):
        llm = LLM(**start.vllm_kwargs)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertlib.checkpoint import BaseCheckpoint
from expertlib.engine import memory
from expertlib.errors import EngineError, ModelLoadError, SlotError
from expertlib.vllm_plugin import WORKER_EXTENSION, slot_hf_overrides


@dataclass(frozen=True)
class EngineStart:
    """An engine's settings before vLLM starts: the base checkpoint, vLLM's arguments (memory sized),
    the line saying what was sized, and the engine's own options (`host_cache`, `packed_cache`: the
    packed-set disk cache's bound in bytes, `verify_loads`)."""

    base: BaseCheckpoint
    vllm_kwargs: dict[str, Any]
    memory: str
    host_cache: int | None = None
    verify_always: bool = False
    packed_cache: int | None = None

    @classmethod
    def of(cls, base: str | Path, *, slots: int, max_sets: int, engine_kwargs: dict[str, Any]) -> EngineStart:
        ckpt = BaseCheckpoint(resolve_base(base))
        kw = dict(engine_kwargs)
        host_cache = kw.pop("host_cache", None)
        packed_cache = kw.pop("packed_cache", None)
        always = verify_always(kw.pop("verify_loads", "once"))
        kw, line = memory.size_memory(ckpt, slots, kw)
        return cls(ckpt, vllm_kwargs(ckpt, slots, max_sets, kw), line, host_cache, always, packed_cache)

    def cache_budget(self) -> int:
        """The workers' host cache: as given, else from the memory free now (after vLLM started)."""
        return cache_budget(self.host_cache)


def resolve_base(base: str | Path) -> Path:
    """A local folder holding the base model (a hub id resolves through the local HF cache only)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base), local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several error types
        raise ModelLoadError(
            f"base model {str(base)!r} is neither a folder nor in the local Hugging Face cache",
            hint="pass the folder of a saved model (config.json + safetensors)",
        ) from exc


def vllm_kwargs(base: BaseCheckpoint, slots: int, max_sets: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments for a slot engine: the slot layout in the model's config, the worker
    extension, and on GPUs the Triton MoE kernel with tuned configs for E + S experts."""
    if slots < 1 or max_sets < 1:
        raise SlotError("slots and max_sets must be >= 1")
    kw = dict(kwargs)
    overrides = dict(kw.pop("hf_overrides", None) or {})
    overrides.update(slot_hf_overrides(base.config.model_type, slots=slots, max_sets=max_sets))
    if kw.get("worker_extension_cls") not in (None, WORKER_EXTENSION):
        raise EngineError("worker_extension_cls is set by ExpertEngine", hint="do not pass it")
    kw.update(model=str(base.path), hf_overrides=overrides, worker_extension_cls=WORKER_EXTENSION)
    _refuse_unsupported_layouts(kw)
    if not memory.on_cpu():  # only Triton keeps checkpoint layout and calls the slot router (docs/GPU.md)
        kw.setdefault("moe_backend", "triton")
        from expertlib.vllm_plugin.moe_configs import use_tuned_configs

        text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        use_tuned_configs(
            base.num_experts,
            slots,
            int(inter),
            tensor_parallel_size=int(kw.get("tensor_parallel_size") or 1),
            dtype=kw.get("dtype"),
        )
    return kw


def _refuse_unsupported_layouts(kw: dict[str, Any]) -> None:
    """Pipeline stages hold only their own layers (the workers' slot layouts would disagree), and vLLM's
    routing simulator picks experts itself (tokens would land in empty slots): refuse both up front."""
    if int(kw.get("pipeline_parallel_size") or 1) > 1:
        raise EngineError(
            "expert slots do not support pipeline parallelism (each stage holds only its own MoE layers)",
            hint="serve with --engine-arg tensor_parallel_size=N instead of pipeline_parallel_size",
        )
    if os.environ.get("VLLM_MOE_ROUTING_SIMULATION_STRATEGY"):
        raise EngineError(
            "VLLM_MOE_ROUTING_SIMULATION_STRATEGY is set: vLLM's routing simulator would send tokens to "
            "random experts, empty slots included",
            hint="unset VLLM_MOE_ROUTING_SIMULATION_STRATEGY to serve expert sets",
        )


def cache_budget(budget: int | None) -> int:
    """The workers' host cache of recent sets: as given, else a tenth of free memory (at most 4 GiB)."""
    from expertlib import sizing

    return int(budget) if budget is not None else sizing.host_cache_budget(sizing.available_memory())


def verify_always(mode: str) -> bool:
    """`verify_loads`: "once" (hash a set file once, trust it while unchanged) or "always"."""
    if mode not in ("once", "always"):
        raise EngineError(
            f"verify_loads must be 'once' or 'always', not {mode!r}", hint="pass once or always"
        )
    return mode == "always"


__all__ = ["EngineStart", "cache_budget", "resolve_base", "verify_always", "vllm_kwargs"]
