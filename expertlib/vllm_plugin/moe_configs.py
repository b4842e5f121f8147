"""vLLM's tuned Triton MoE configs for layers with expert slots (GPUs only).

vLLM picks the Triton fused-MoE tile sizes from a JSON file named after the layer's expert count E,
its per-rank intermediate size N, the GPU and the dtype (`E=128,N=768,device_name=NVIDIA_H200.json`,
`vllm/model_executor/layers/fused_moe/configs/`). A slot layer has E + S experts, a count no shipped
file names, so without help every MoE layer runs vLLM's default config ("Using default MoE config"),
sets loaded or not. Before a slot engine starts on a GPU, `use_tuned_configs` copies the file for E
under the name for E + S into a folder of ours and points `VLLM_TUNED_CONFIG_FOLDER` at it (vLLM reads
that folder first). A folder the user had set is copied in first, so its files still win. The tile
sizes depend on the tokens per expert and the matrix shapes, which the extra (mostly idle) slot rows do
not change.

The same kernel needs E + S, padded to a multiple of 32, below 1024 (`triton_moe.py`); a larger count
is refused here with the number of slots that fits, instead of failing inside vLLM's start-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from expertlib.errors import SlotError

log = logging.getLogger(__name__)

FOLDER_ENV = "VLLM_TUNED_CONFIG_FOLDER"
#: The Triton MoE kernel's limit: E + S rounded up to a multiple of 32 must stay below this.
TRITON_PADDED_EXPERT_LIMIT = 1024


def check_expert_count(num_experts: int, slots: int) -> None:
    """Refuse E + S experts the Triton MoE kernel cannot align (padded to 32, must be < 1024)."""
    padded = (num_experts + slots + 31) // 32 * 32
    if padded >= TRITON_PADDED_EXPERT_LIMIT:
        most = TRITON_PADDED_EXPERT_LIMIT - 32 - num_experts
        raise SlotError(
            f"{num_experts} experts plus {slots} slots per MoE layer ({padded} once padded to a multiple of "
            f"32) exceed what vLLM's Triton MoE kernel aligns (fewer than {TRITON_PADDED_EXPERT_LIMIT})",
            hint=f"pass --slots {most} or fewer" if most > 0 else "this base has too many experts for slots",
        )


def config_dtype(dtype: Any) -> str | None:
    """The dtype part of vLLM's config file name for unquantized weights: float32 has its own files,
    bf16/fp16 (and `auto`, which vLLM serves as half precision) share the plain ones."""
    name = str(dtype).removeprefix("torch.").lower() if dtype is not None else "auto"
    return "float32" if name in ("float32", "float") else None


def config_file_name(num_experts: int, intermediate: int, dtype: str | None) -> str:
    """vLLM's own file name for a tuned config on this machine's GPU (it reads the device name
    through NVML, without creating a CUDA context)."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    return get_config_file_name(num_experts, intermediate, dtype)


def shipped_configs_dir() -> Path:
    import vllm.model_executor.layers.fused_moe as fused_moe

    return Path(fused_moe.__file__).parent / "configs"


def default_folder(user_folder: str | None) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "expertlib" / "moe-configs"
    if user_folder:  # one folder per user folder: its files are copied in
        return cache / ("user-" + hashlib.sha256(os.path.abspath(user_folder).encode()).hexdigest()[:12])
    return cache / "vllm"


def write_tuned_configs(
    num_experts: int, slots: int, intermediate: int, dtype: str | None, folder: Path, user_folder: str | None
) -> Path | None:
    """Fill `folder` with the user's configs (if any) and the config for E under the name for E + S.
    Returns the file written, or None when neither vLLM nor the user has a config for E."""
    src_name = config_file_name(num_experts, intermediate, dtype)
    dst_name = config_file_name(num_experts + slots, intermediate, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    if user_folder and Path(user_folder).resolve() != folder.resolve():
        for f in sorted(Path(user_folder).glob("*.json")):
            _copy(f, folder / f.name)
        sources.append(Path(user_folder) / src_name)
    sources.append(shipped_configs_dir() / src_name)
    found = next((p for p in sources if p.is_file()), None)
    if found is None:
        return None
    if user_folder and (Path(user_folder) / dst_name).is_file():
        return folder / dst_name  # the user tuned E + S themselves
    _copy(found, folder / dst_name)
    return folder / dst_name


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)  # engines starting at once never read half a file


def use_tuned_configs(
    num_experts: int, slots: int, intermediate: int, *, tensor_parallel_size: int = 1, dtype: Any = None
) -> Path | None:
    """Before a slot engine starts on a GPU: check E + S, then point `VLLM_TUNED_CONFIG_FOLDER` at a
    folder holding vLLM's tuned config for E under the name for E + S. Returns the file, or None (and
    vLLM uses its default config, as it would for the base alone) when there is none for this GPU."""
    check_expert_count(num_experts, slots)
    user = os.environ.get(FOLDER_ENV) or None
    ours = Path(user).parent.name == "moe-configs" if user else False
    folder = Path(user) if ours else default_folder(user)
    n = intermediate // max(int(tensor_parallel_size), 1)
    try:
        written = write_tuned_configs(
            num_experts, slots, n, config_dtype(dtype), folder, None if ours else user
        )
    except OSError as exc:  # a read-only home: the engine still runs, with vLLM's default config
        log.warning("could not write tuned MoE configs to %s (%s); vLLM uses its default", folder, exc)
        return None
    if written is None:
        log.info(
            "vLLM ships no tuned MoE config for E=%d, N=%d on this GPU; it uses its default", num_experts, n
        )
        return None
    os.environ[FOLDER_ENV] = str(folder)
    log.info("tuned MoE config for %d experts + %d slots: %s", num_experts, slots, written)
    return written


__all__ = ["check_expert_count", "config_file_name", "use_tuned_configs", "write_tuned_configs"]
