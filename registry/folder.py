"""The registry folder itself: where it is, its SQLite index and blob store, and whether it may be written.

The jobs on top of it have their own modules (reading, publishing, upkeep); `RegistryStore`
(registry/local.py) is all of them.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from expertlib.constants import DEFAULT_REGISTRY_DIR, REGISTRY_ENV
from expertlib.errors import IntegrityError, NotFoundError, ReadOnlyRegistryError
from expertlib.identity import BaseIdentity
from expertlib.registry import index
from expertlib.registry.blobs import BlobStore
from expertlib.registry.storage import read_only_folder, storage_errors

#: what a `base=` argument may be: an identity, a base model folder, or a base's name or config digest
BaseArg = BaseIdentity | str | Path | None


def default_root() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_DIR).expanduser()


class StoreFolder:
    """A registry folder rooted at `root` (created on first use); see `RegistryStore`."""

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        read_only: bool | None = None,
        busy_timeout: float | None = None,
    ):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.blobs = BlobStore(self.root)
        self.busy_timeout_ms = int(busy_timeout * 1000) if busy_timeout is not None else index.BUSY_TIMEOUT_MS
        has_index = (self.root / index.INDEX_FILE).exists()
        if (self.root / "blobs").exists() and not has_index:
            raise IntegrityError(
                f"{self.root} has blobs but no {index.INDEX_FILE}",
                hint="this is not an expertlib registry, or its index was deleted",
            )
        self.read_only = read_only_folder(self.root) if read_only is None else read_only
        if self.read_only:
            if not has_index:
                raise NotFoundError(
                    f"no expertlib registry at {self.root} (no {index.INDEX_FILE})",
                    hint="a read-only folder must already hold a registry",
                )
            con = self._con()
            try:
                index.check_schema(con, self.root)
            finally:
                con.close()
            return
        with storage_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            self.blobs.ensure()
            index.init(self.root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def _con(self) -> sqlite3.Connection:
        return index.connect(self.root, busy_timeout_ms=self.busy_timeout_ms, read_only=self.read_only)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyRegistryError(
                f"the registry at {self.root} is read-only",
                hint="pull the sets into a writable registry (expertlib pull SOURCE --registry DIR)",
            )
