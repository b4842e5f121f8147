"""What the file system and SQLite say, as registry errors: a full disk, a read-only mount, a locked
index; and whether a registry folder is one this process may write."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
from pathlib import Path

from expertlib.errors import ReadOnlyRegistryError, RegistryBusyError, StorageFullError
from expertlib.registry import index

#: "1" opens every registry read-only (e.g. a snapshot that this process could write but must not).
READ_ONLY_ENV = "EXPERTLIB_REGISTRY_READ_ONLY"


def read_only_folder(root: Path) -> bool:
    """An existing registry folder this process cannot write (read-only mount or permissions)."""
    if not (root / index.INDEX_FILE).exists():
        return False
    if os.environ.get(READ_ONLY_ENV, "") not in ("", "0"):
        return True
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return True
    except (OSError, AttributeError):
        pass
    return not os.access(root, os.W_OK)


@contextlib.contextmanager
def storage_errors(root: Path):
    """SQLite and file-system failures as one-line registry errors with a hint."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise RegistryBusyError(
                f"the registry index at {root} is locked by another process",
                hint="retry in a moment (a long publish or gc holds the lock)",
            ) from None
        if "disk is full" in text or "disk i/o" in text:
            raise StorageFullError(
                f"cannot write the registry at {root}: {exc}", hint="free disk space, then retry"
            ) from None
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            raise ReadOnlyRegistryError(
                f"cannot write the registry at {root}: {exc}",
                hint="it is on a read-only filesystem; pull into a writable registry instead",
            ) from None
        raise
    except OSError as exc:
        if isinstance(exc, sqlite3.Error) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        if exc.errno == errno.EROFS:
            raise ReadOnlyRegistryError(
                f"cannot write the registry at {root}: read-only filesystem",
                hint="pull into a writable registry instead",
            ) from None
        raise StorageFullError(
            f"no space left to write {exc.filename or root}",
            hint="free disk space (or `expertlib gc`), then retry; nothing was changed",
        ) from None


def translate_storage_errors(fn):
    """Method decorator: a full disk or read-only filesystem becomes one clear registry error."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with storage_errors(self.root):
            return fn(self, *args, **kwargs)

    return wrapper
