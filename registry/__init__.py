"""The expert-set registry: publish, version, tag, list, diff, push and pull expert sets.

    from expertlib.registry import Registry
    reg = Registry("./reg")                      # or $EXPERTLIB_REGISTRY, ~/.cache/expertlib/registry
    reg.publish("math.safetensors", tags=["stable"])
    reg.open("math@stable")                      # ExpertSet
    reg.diff(["math@1", "code"], base_dir="./base")
    reg.push("math", "/shared/registry"); reg.pull("hf://me/tiny-math@main")

Storage only: the registry never loads a model (docs/ARCHITECTURE.md, "Packages and layers").
"""

from expertlib.registry.local import RegistryStore, default_root
from expertlib.registry.names import LATEST, Ref, RefSpec, parse_ref, validate_name, validate_tag
from expertlib.registry.protocol import Entry, GcReport, TransferReport, VerifyReport
from expertlib.registry.registry import Registry

__all__ = [
    "LATEST",
    "Entry",
    "GcReport",
    "Ref",
    "RefSpec",
    "Registry",
    "RegistryStore",
    "TransferReport",
    "VerifyReport",
    "default_root",
    "parse_ref",
    "validate_name",
    "validate_tag",
]
