"""Content-addressed blob storage: `blobs/<algorithm>/<2 hex>/<64 hex>.safetensors`, the algorithm
being blake3 (patch format 4 on) or sha256 (older sets; `expertlib.verify.hash_of`).

A blob enters in two steps so that no reader ever sees a partial file:

    tmp = store.write_temp(src)      # copy into tmp/ while hashing, fsync
    store.commit(tmp)                # rename into blobs/ (atomic), fsync the folder

A writer killed before `commit` leaves only a file in tmp/ (named with host and pid, so `gc`
knows when it is stale); a writer killed after it leaves a complete, valid, unreferenced blob.

A copy into the store is one pass over the bytes: each chunk is written while two threads hash it
(`expertlib.verify.StreamScan`): per tensor (the patch's own digests and max |w|) and, for a patch
of format 3 or later, nothing more, its address being a tree over those same leaves
(`expertlib.verify.blob_digest`); older files' address is the sha256 of the whole file, hashed on
its own thread. Publish, push and pull need no second read. Where the filesystem can clone a file (a
reflink: btrfs, XFS, copy-on-write) the copy is a clone and only the hashing reads the bytes; else a
file is copied inside the kernel (`copy_file_range`) and hashed from a memory map of the copy; never a
hard link, which an edit of the source would change. Each piece is handed to the disk as soon as it
landed (`start_writeback`), so the disk writes while the bytes are hashed and the fsync finds little left.

A blob checked in full (at publish, pull or import, or by `expertlib verify`) gets a verified record
in `verified/blake3/<64 hex>.json` (`verified/<64 hex>.json` for a sha256 address): the blob's file
state then (`expertlib.verify.FileKey`) and what the check found. Loads trust the record while the
blob's file still matches it and check in full otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import mmap
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from expertlib.constants import PATCH_SUFFIX
from expertlib.errors import DigestMismatchError
from expertlib.fsutil import atomic_path
from expertlib.registry.names import DIGEST_ALGORITHMS, digest_path, split_digest, validate_digest
from expertlib.verify import FileKey, StreamScan, VerifiedRecord

CHUNK = 1 << 20
#: chunk of a copy into the store: small enough to stay in the CPU cache between the read, the write
#: and the two hash threads, large enough that the per-chunk overhead is small
COPY_CHUNK = 1 << 20
#: piece of an in-kernel copy into the store, hashed from a memory map as soon as it landed
KERNEL_CHUNK = 8 << 20
#: Linux's FICLONE ioctl: make `dst` a copy-on-write clone of `src` (btrfs, XFS, bcachefs, ...)
FICLONE = 0x40049409
#: Linux's sync_file_range flag: start writing a range's dirty pages to disk, without waiting
SYNC_FILE_RANGE_WRITE = 2
BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
RECORDS_DIR = "verified"
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


def stream_file(path: str | Path) -> StreamScan:
    """One pass over the file at `path`: its address (`.digest()`, see `expertlib.verify.blob_digest`)
    and the check of its tensors (`.scan(manifest)`), hashed from a memory map (no copy)."""
    stream = StreamScan()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            stream.update(b"")
            stream.digest()
            return stream
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    try:
        for at in range(0, size, KERNEL_CHUNK):
            stream.update(view[at : at + KERNEL_CHUNK])
        stream.digest()  # every piece hashed: the map may close
    finally:
        view.release()
        with contextlib.suppress(BufferError):
            mm.close()
    return stream


def file_digest(path: str | Path) -> str:
    """The address a registry stores the file at `path` under (`expertlib.verify.blob_digest`)."""
    return stream_file(path).digest()


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
    #: what hashing the bytes on their way in found (per-tensor digests, max |w|), and the temp
    #: file's state right after it was written: a check of exactly those bytes
    stream: StreamScan | None = None
    key: FileKey | None = None


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_dir = self.root / TMP_DIR

    def blob_dir(self, algorithm: str) -> Path:
        return self.root / BLOBS_DIR / algorithm

    def ensure(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algorithm, hexd = split_digest(validate_digest(digest))
        return self.blob_dir(algorithm) / hexd[:2] / f"{hexd}{PATCH_SUFFIX}"

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    # --- verified records ----------------------------------------------------------------------

    def record_path(self, digest: str) -> Path:
        return self.root / RECORDS_DIR / f"{digest_path(digest)}.json"

    def record(self, digest: str, content_digest: str) -> VerifiedRecord | None:
        """The blob's verified record, if the blob file is unchanged since that check."""
        try:
            record = VerifiedRecord.model_validate_json(self.record_path(digest).read_bytes())
        except (OSError, ValueError):
            return None
        return record if record.matches(self.path(digest), content_digest) else None

    def keep_record(self, digest: str, checked: VerifiedRecord | None) -> None:
        """Store the record of a full check of the blob file itself, or of the temp file that was
        renamed into place (same inode, size and mtime; the rename and chmod moved its ctime only)."""
        if checked is None:
            return
        path = self.path(digest)
        key = FileKey.of(path)
        was = checked.key
        if key is None or list(key)[:4] != was[:4]:
            return  # not the file that was checked, or written since: no record
        record = checked.model_copy(update={"path": str(path.resolve()), "key": list(key)})
        target = self.record_path(digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                Path(tmp).write_text(record.model_dump_json())
        except OSError:  # a read-only registry: loads check in full
            pass

    def forget_record(self, digest: str) -> None:
        self.record_path(digest).unlink(missing_ok=True)

    # --- writing -------------------------------------------------------------------------------

    def temp_path(self) -> Path:
        return self.tmp_dir / f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"

    def write_temp(
        self,
        src: str | Path | BinaryIO | Iterator[bytes] | Callable[[int], Iterator[bytes | int]],
        *,
        expected_digest: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TempBlob:
        """Copy `src` (a path, a binary file, an iterator of chunks, or a function of the temp file's
        descriptor giving such an iterator whose items may also be ints: bytes it wrote into that
        descriptor itself, at its position, as a download spliced from its socket does) into tmp/
        and fsync it, the bytes hashed as they land (see the module docstring); `progress(n)` is
        called with the bytes of each piece. Refused (DigestMismatchError, nothing kept) unless the
        bytes' address is `expected_digest`, when given."""
        self.ensure()
        tmp = self.temp_path()
        stream = StreamScan()
        try:
            with open(tmp, "w+b", buffering=0) as out:  # read too: the hashing maps what was written
                landed = _Landed(out.fileno(), stream)
                try:
                    path = isinstance(src, (str, Path))
                    if path and _reflink(src, out):  # a clone: only the hashing reads the bytes
                        if progress is not None:
                            progress(os.fstat(out.fileno()).st_size)
                    elif not (path and _kernel_copy(src, out, landed, progress)):
                        for chunk in _chunks(src(out.fileno()) if callable(src) else src):
                            if isinstance(chunk, int):  # written by the source itself
                                n = chunk
                            else:
                                _write_all(out, chunk)
                                n = len(chunk)
                            landed.advance(landed.written + n)
                            if progress is not None:
                                progress(n)
                            test_hook("write")  # (tests: a writer killed with the file half written)
                    landed.advance(os.fstat(out.fileno()).st_size, final=True)
                    os.fsync(out.fileno())  # while the hash threads finish the last pieces
                    digest = stream.digest()
                finally:
                    landed.close()
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatchError(
                    f"received bytes have digest {digest[:19]}..., expected {expected_digest[:19]}...",
                    hint="the transfer was damaged or the source is corrupt; run `expertlib verify` there and retry",
                )
        except BaseException:
            stream.digest()  # stop its threads
            tmp.unlink(missing_ok=True)
            raise
        return TempBlob(tmp, digest, stream.size, stream, FileKey.of(tmp))

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
        if new_dir:  # the new folder's own entry too: both at once (5.0 -> 0.6 ms, measured)
            with ThreadPoolExecutor(1, thread_name_prefix="expertlib-fsync") as pool:
                parent = pool.submit(fsync_dir, target.parent.parent)
                fsync_dir(target.parent)
                parent.result()
        else:
            fsync_dir(target.parent)
        return target

    # --- reading and cleaning ------------------------------------------------------------------

    def iter_digests(self) -> Iterator[str]:
        for algorithm in DIGEST_ALGORITHMS:
            folder = self.blob_dir(algorithm)
            if not folder.is_dir():
                continue
            for sub in sorted(folder.iterdir()):
                if sub.is_dir():
                    for f in sorted(sub.glob(f"*{PATCH_SUFFIX}")):
                        yield f"{algorithm}:{f.name.removesuffix(PATCH_SUFFIX)}"

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


def _reflink(src: str | Path, out) -> bool:
    """Make the empty file `out` a copy-on-write clone of `src` where the filesystem supports it."""
    try:
        with open(src, "rb") as fin:
            fcntl.ioctl(out.fileno(), FICLONE, fin.fileno())
        return True
    except OSError:
        return False


def _kernel_copy(src: str | Path, out, landed: _Landed, progress: Callable[[int], None] | None) -> bool:
    """Copy `src` into the empty file `out` inside the kernel (`os.copy_file_range`: the bytes never
    pass through this process), hashing each piece as it lands. False where the kernel or the
    filesystem cannot (nothing was written then: copy the ordinary way)."""
    if not hasattr(os, "copy_file_range"):
        return False
    with open(src, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        while done < size:
            try:
                step = min(KERNEL_CHUNK if done else COPY_CHUNK, size - done)
                n = os.copy_file_range(fin.fileno(), out.fileno(), step, done, done)
            except OSError:
                if done == 0:  # not across these filesystems (or not at all): nothing was written
                    return False
                raise
            if n <= 0:
                raise DigestMismatchError(
                    f"{src} shrank while it was copied", hint="publish it again once it is written"
                )
            done += n
            landed.advance(done)
            if progress is not None:
                progress(n)
            test_hook("write")
    return True


def _write_all(out, chunk) -> None:
    view = memoryview(chunk)
    while len(view):
        view = view[out.write(view) :]


class _Landed:
    """Feeds a `StreamScan` the bytes of a file being written, from memory maps of the pieces that
    have landed in it: the bytes hashed are the bytes stored (the file is ours alone), read from the
    page cache without a copy. Pieces of KERNEL_CHUNK (a small first one starts the hashing soon).
    Each piece is handed to the disk (`start_writeback`) from a thread of its own: the call waits
    while the disk's queue is full (0.06 s per 144 MiB on the copying thread, measured), which
    would hold up the copy."""

    def __init__(self, fd: int, stream: StreamScan):
        self.fd, self.stream = fd, stream
        self.written = 0  # bytes in the file
        self.fed = 0  # bytes handed to the stream (a multiple of the map granularity until the end)
        self._maps: list[mmap.mmap] = []
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="expertlib-writeback")

    def advance(self, written: int, *, final: bool = False) -> None:
        self.written = written
        while True:
            step = COPY_CHUNK if self.fed == 0 else KERNEL_CHUNK
            if written - self.fed < step and not (final and written > self.fed):
                return
            step = min(step, written - self.fed)
            mm = mmap.mmap(self.fd, step, access=mmap.ACCESS_READ, offset=self.fed)
            self._maps.append(mm)
            self.stream.update(memoryview(mm))
            self._disk.submit(start_writeback, self.fd, self.fed, step)
            self.fed += step

    def close(self) -> None:
        """After `stream.digest()`: no piece is in use any more. Before the file closes: no
        writeback call may reach its descriptor after that."""
        self._disk.shutdown()
        for mm in self._maps:
            with contextlib.suppress(BufferError):  # a view still held by a failed hash: closed by gc
                mm.close()
        self._maps = []


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing a range of the file `fd` to disk now, without waiting (Linux's sync_file_range):
    the disk writes a blob while its bytes are hashed, so the fsync before the blob enters finds
    little left to write (measured: 0.06 s of fsync after a 144 MiB copy, under 0.01 s this way).
    Elsewhere, and wherever the call fails, the fsync writes it all as before."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, size, SYNC_FILE_RANGE_WRITE)  # its result does not matter: fsync follows


@functools.cache
def _sync_file_range():
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (or no such call in this C library)
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _chunks(src) -> Iterator[bytes]:
    if isinstance(src, (str, Path)):
        with open(src, "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                yield chunk
    elif hasattr(src, "read"):
        while chunk := src.read(COPY_CHUNK):
            yield chunk
    else:  # a network stream's chunks, written as they come (the hashing reads them back in pieces)
        yield from src
