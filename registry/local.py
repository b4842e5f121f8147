"""The registry's storage: a folder with content-addressed blobs and an SQLite index.

`RegistryStore` publishes, versions, tags, opens, verifies and collects garbage; `expertlib.registry.
Registry` adds diff and transfers on top of it (dependencies run one way: remotes use the store).
Each job has its module: the folder and its index (folder.py), queries (reading.py), publishing
(publishing.py), tags, removal, gc and verification (upkeep.py), and storage failures as registry
errors (storage.py); this one puts them together.

    reg = Registry()                                  # $EXPERTLIB_REGISTRY or ~/.cache/expertlib/registry
    entry = reg.publish("math.safetensors", tags=["stable"])
    reg.resolve("math@stable").ref                    # Ref(name='math', version=1, digest='blake3:...')
    reg.open("math@1")                                # ExpertSet, opened lazily from the blob

Layout of the folder:

    index.db                       SQLite (WAL): bases, names, versions, tags
    blobs/blake3/ab/ab12....safetensors   patch files, named by their digest (older sets: blobs/sha256/)
    tmp/                           files being written (removed by gc once their writer is gone)

Names are per base model (model_type + structural config digest): `math` for base A and
`math` for base B are different sets; a reference that matches both asks for `base=`.
Version numbers are never reused, even after `rm`. The registry stores and lists; it never
loads a model.
"""

from __future__ import annotations

from expertlib.registry.folder import BaseArg, default_root
from expertlib.registry.publishing import StorePublishing
from expertlib.registry.storage import translate_storage_errors
from expertlib.registry.upkeep import StoreUpkeep

__all__ = ["BaseArg", "RegistryStore", "default_root", "translate_storage_errors"]


class RegistryStore(StorePublishing, StoreUpkeep):
    """A local expert-set registry rooted at `root` (created on first use).

    `read_only` (default: detected, a read-only folder or mount) opens an existing registry without
    writing anything, so every read works on a mounted snapshot; writes then raise
    ReadOnlyRegistryError. `busy_timeout` (seconds) is how long a call waits for another process's
    lock on the index before RegistryBusyError; a server uses a short one on its request path."""


for _name in (
    "bases", "list", "resolve", "show", "get_path", "open", "publish", "tag", "untag", "rm",
    "has_digest", "gc", "verify",
):  # fmt: skip
    setattr(RegistryStore, _name, translate_storage_errors(getattr(RegistryStore, _name)))
