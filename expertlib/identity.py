"""A stable identity for a base model, cheap to compute.

A patch records (1) the digest of the base model's *structural* config and (2) the digest of
every base expert it replaces (`ExpertSetManifest.base_expert_digests`). Checking a patch
against a model hashes only those experts, never the whole checkpoint, yet refuses a patch
made for base A on a base B that has the same config but other weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Config fields that define the shape and routing of a model. Anything else (dtype, paths,
#: versions, attention implementation, generation defaults) does not change the identity.
STRUCTURAL_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "first_k_dense_replace",
    "moe_layer_freq",
    "decoder_sparse_step",
    "mlp_only_layers",
    "norm_topk_prob",
    "topk_method",
    "scoring_func",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "hidden_act",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
)


class BaseIdentity(BaseModel):
    """Which base model a patch belongs to."""

    model_config = ConfigDict(frozen=True)

    model_type: str = Field(description="transformers model_type of the base, e.g. qwen2_moe")
    config_digest: str = Field(description="sha256 of the base's structural config fields")
    name: str | None = Field(
        default=None, description="human name of the base (folder or hub id); informative"
    )

    def same_base(self, other: BaseIdentity) -> bool:
        return self.model_type == other.model_type and self.config_digest == other.config_digest


def structural_config(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d[k] for k in STRUCTURAL_CONFIG_KEYS if d.get(k) is not None}


def config_digest(config: Any) -> str:
    blob = json.dumps(structural_config(config), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def base_identity(model_or_config: Any, name: str | Path | None = None) -> BaseIdentity:
    """Identity of a loaded model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    if name is None:
        name = getattr(config, "_name_or_path", None) or None
    return BaseIdentity(
        model_type=config.model_type, config_digest=config_digest(config), name=str(name) if name else None
    )


def load_config(base: str | Path):
    """The transformers config of the base model at `base` (a folder or a hub id; no weights read)."""
    from transformers import AutoConfig

    from expertlib.errors import ModelLoadError

    try:
        return AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # transformers raises OSError/ValueError/... depending on the failure
        raise ModelLoadError(
            f"cannot load a model config from {str(base)!r}: {exc}",
            hint="pass a folder written by save_pretrained (config.json + safetensors) or a reachable hub id",
        ) from exc


def folder_identity(folder: str | Path) -> BaseIdentity:
    """Identity of the base model in `folder`, from its config alone (no weights are read; cached
    while config.json is unchanged): how the registry names a base folder."""
    cfg = Path(folder, "config.json")
    mtime = cfg.stat().st_mtime_ns if cfg.is_file() else 0
    return _folder_identity(str(folder), mtime)


@functools.lru_cache(maxsize=64)
def _folder_identity(folder: str, mtime: int) -> BaseIdentity:
    return base_identity(load_config(folder), name=folder)
