"""What the registry needs from a base model folder, without loading the model.

    folder_identity("./base")              # BaseIdentity from config.json only (cached)

Base expert weights are read by `expertlib.checkpoint.BaseCheckpoint` (lazy safetensors).
"""

from __future__ import annotations

import functools
from pathlib import Path

from expertlib.errors import ModelLoadError
from expertlib.identity import BaseIdentity, base_identity


def _config(folder: str | Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on the failure
        raise ModelLoadError(
            f"cannot read a model config from {str(folder)!r}: {exc}",
            hint="pass a base model folder written by save_pretrained (with config.json)",
        ) from exc


def folder_identity(folder: str | Path) -> BaseIdentity:
    """Identity of the base model in `folder`, from its config alone (no weights are read; cached)."""
    cfg = Path(folder, "config.json")
    mtime = cfg.stat().st_mtime_ns if cfg.is_file() else 0
    return _folder_identity(str(folder), mtime)


@functools.lru_cache(maxsize=64)
def _folder_identity(folder: str, mtime: int) -> BaseIdentity:
    return base_identity(_config(folder), name=folder)
