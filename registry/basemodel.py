"""What the registry needs from a base model folder, without loading the model.

    folder_identity("./base")              # BaseIdentity from config.json only (cached)

Base expert weights are read by `expertlib.checkpoint.BaseCheckpoint` (lazy safetensors).
"""

from __future__ import annotations

import functools
from pathlib import Path

from expertlib.identity import BaseIdentity, base_identity, load_config


def folder_identity(folder: str | Path) -> BaseIdentity:
    """Identity of the base model in `folder`, from its config alone (no weights are read; cached)."""
    cfg = Path(folder, "config.json")
    mtime = cfg.stat().st_mtime_ns if cfg.is_file() else 0
    return _folder_identity(str(folder), mtime)


@functools.lru_cache(maxsize=64)
def _folder_identity(folder: str, mtime: int) -> BaseIdentity:
    return base_identity(load_config(folder), name=folder)
