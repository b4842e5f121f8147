"""What the registry needs from a base model folder, without loading the model.

    folder_identity("./base")              # BaseIdentity from config.json only
    with BaseCheckpoint("./base") as ck:
        ck.expert(layer, e)                 # ExpertWeights read lazily from the safetensors shards

Per-expert checkpoint keys come from `expertlib.moe.ARCHITECTURES`; architectures that store
experts fused on disk (gpt_oss) are refused with a clear message.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from safetensors import safe_open

from expertlib.errors import ModelLoadError
from expertlib.identity import BaseIdentity, base_identity
from expertlib.moe import ARCHITECTURES, ExpertWeights, arch_spec

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


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


class BaseCheckpoint:
    """Lazy reader of routed experts from a base model's safetensors checkpoint."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = _config(folder)
        self.identity = base_identity(self.config, name=str(folder))
        self.spec = arch_spec(self.config.model_type)
        self.num_experts = int(getattr(self.config, self.spec.experts_field))
        if self.spec.checkpoint_key is None:
            raise ModelLoadError(
                f"{self.config.model_type} stores its experts fused on disk; reading single base experts "
                "from its checkpoint is not supported",
                hint="supported here: " + ", ".join(m for m, s in ARCHITECTURES.items() if s.checkpoint_key),
            )
        if (self.folder / _INDEX).is_file():
            weight_map = json.loads((self.folder / _INDEX).read_text())["weight_map"]
        elif (self.folder / _SINGLE).is_file():
            weight_map = None
        else:
            raise ModelLoadError(
                f"no safetensors checkpoint in {self.folder}",
                hint="the base folder needs model.safetensors[.index.json]",
            )
        self._weight_map = weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, key: str):
        fname = _SINGLE if self._weight_map is None else self._weight_map.get(key)
        if fname is None:
            raise ModelLoadError(f"checkpoint key {key!r} not in {self.folder / _INDEX}", hint=_KEY_HINT)
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.folder / fname), framework="pt")
        return self._handles[fname]

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        parts = {}
        for part, proj in zip(("gate", "up", "down"), self.spec.proj_names, strict=True):
            key = self.spec.checkpoint_key.format(layer=layer, expert=expert, proj=proj)
            h = self._handle(key)
            if key not in h.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ModelLoadError(f"checkpoint key {key!r} not found in {self.folder}", hint=_KEY_HINT)
            parts[part] = h.get_tensor(key)
        return ExpertWeights(**parts)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_KEY_HINT = "the base checkpoint does not store experts under the expected per-expert keys"
