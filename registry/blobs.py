"""Content-addressed blob storage: `blobs/sha256/<2 hex>/<64 hex>.safetensors`.

A blob enters in two steps so that no reader ever sees a partial file:

    tmp = store.write_temp(src)      # copy into tmp/ while hashing, fsync
    store.commit(tmp)                # rename into blobs/ (atomic), fsync the folder

A writer killed before `commit` leaves only a file in tmp/ (named with host and pid, so `gc`
knows when it is stale); a writer killed after it leaves a complete, valid, unreferenced blob.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from expertlib.constants import PATCH_SUFFIX
from expertlib.errors import DigestMismatchError
from expertlib.registry.names import DIGEST_PREFIX, validate_digest

CHUNK = 1 << 20
BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
TMP_SUFFIX = ".part"

#: Test hook: "<stage>:<marker file>" makes a writer create the marker and sleep at that stage,
#: so a test can kill it there. Stages: "write" (temp file half written), "commit" (blob renamed
#: into place, index transaction still open).
HOOK_ENV = "EXPERTLIB_REGISTRY_TEST_HOOK"


def test_hook(stage: str) -> None:
    spec = os.environ.get(HOOK_ENV)
    if not spec or not spec.startswith(stage + ":"):
        return
    Path(spec.split(":", 1)[1]).write_text(str(os.getpid()))
    while True:  # wait to be killed
        time.sleep(0.05)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return DIGEST_PREFIX + h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TempBlob:
    path: Path
    digest: str
    size: int


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_dir = self.root / BLOBS_DIR / "sha256"
        self.tmp_dir = self.root / TMP_DIR

    def ensure(self) -> None:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexd = validate_digest(digest)[len(DIGEST_PREFIX) :]
        return self.blob_dir / hexd[:2] / f"{hexd}{PATCH_SUFFIX}"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    # --- writing -------------------------------------------------------------------------------

    def temp_path(self) -> Path:
        return self.tmp_dir / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"

    def write_temp(
        self, src: str | Path | BinaryIO | Iterator[bytes], *, expected_digest: str | None = None
    ) -> TempBlob:
        """Copy `src` (a path, a binary file or an iterator of chunks) into tmp/, hashing and fsyncing."""
        self.ensure()
        tmp = self.temp_path()
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                for i, chunk in enumerate(_chunks(src)):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    if i == 0:
                        out.flush()
                        test_hook("write")
                out.flush()
                os.fsync(out.fileno())
            digest = DIGEST_PREFIX + h.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatchError(
                    f"received bytes have digest {digest[:19]}..., expected {expected_digest[:19]}...",
                    hint="the transfer was damaged or the source is corrupt; run `expertlib verify` there and retry",
                )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return TempBlob(tmp, digest, size)

    def commit(self, tmp: TempBlob) -> Path:
        """Move a verified temp blob into place (a no-op when the blob already exists)."""
        target = self.path(tmp.digest)
        if target.is_file() and target.stat().st_size == tmp.size:
            tmp.path.unlink(missing_ok=True)
            return target
        new_dir = not target.parent.is_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp.path, 0o444)  # stored patches are immutable
        os.replace(tmp.path, target)
        fsync_dir(target.parent)
        if new_dir:
            fsync_dir(target.parent.parent)
        return target

    # --- reading and cleaning ------------------------------------------------------------------

    def iter_digests(self) -> Iterator[str]:
        if not self.blob_dir.is_dir():
            return
        for sub in sorted(self.blob_dir.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.glob(f"*{PATCH_SUFFIX}")):
                    yield DIGEST_PREFIX + f.name.removesuffix(PATCH_SUFFIX)

    def stale_temps(self, grace_s: float) -> list[Path]:
        """Temp files whose writer is gone (same host, dead pid) or older than `grace_s`."""
        if not self.tmp_dir.is_dir():
            return []
        host, now, out = socket.gethostname(), time.time(), []
        for f in self.tmp_dir.iterdir():
            parts = f.name.removesuffix(TMP_SUFFIX).rsplit(".", 2)
            dead = (
                len(parts) == 3 and parts[1].isdigit() and parts[0] == host and not _pid_alive(int(parts[1]))
            )
            try:
                old = now - f.stat().st_mtime > grace_s
            except FileNotFoundError:
                continue
            if dead or old:
                out.append(f)
        return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunks(src) -> Iterator[bytes]:
    if isinstance(src, (str, Path)):
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    elif hasattr(src, "read"):
        while chunk := src.read(CHUNK):
            yield chunk
    else:
        for chunk in src:
            if chunk:
                yield bytes(chunk)
