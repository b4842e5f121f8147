"""expertlib: a multi-task expert library and inference server for ESFT-tuned MoE models.

The core API:

    from expertlib import load_model, describe, ExpertSet, apply_expert_set

    base = load_model("path/to/base")
    print(describe(base))                        # MoE structure
    es = ExpertSet.open("math.safetensors")      # lazy, validated
    with apply_expert_set(base, es):             # in place, reverted on exit
        ...
"""

from expertlib.apply import (
    AppliedExpertSet,
    apply_expert_set,
    changed_experts,
    check_compatible,
    extract_expert_set,
)
from expertlib.compose import ComposedModel, compose
from expertlib.identity import BaseIdentity, base_identity
from expertlib.loading import OpenedSet, open_expert_set
from expertlib.moe import (
    SUPPORTED_ARCHITECTURES,
    ExpertWeights,
    MoESpec,
    describe,
    load_model,
    read_expert,
    write_expert,
)
from expertlib.patch import ExpertSet, ExpertSetManifest, Provenance

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AppliedExpertSet",
    "BaseIdentity",
    "ComposedModel",
    "ExpertSet",
    "ExpertSetManifest",
    "ExpertWeights",
    "MoESpec",
    "OpenedSet",
    "Provenance",
    "apply_expert_set",
    "base_identity",
    "changed_experts",
    "check_compatible",
    "compose",
    "describe",
    "extract_expert_set",
    "load_model",
    "open_expert_set",
    "read_expert",
    "write_expert",
]
