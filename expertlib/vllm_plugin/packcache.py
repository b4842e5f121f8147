"""The disk cache of packed sets: a set's experts in the kernel's final layout, kept on disk per (set
content digest, kernel layout), so that a set this machine packed before loads by reading those bytes
straight into its slots: no set file read, no check of it beyond the front end's record, no prepack.

The host cache (`hostcache.py`) keeps packed rows in memory for one process; this one outlives the
process, and its reads land in the slots themselves (no fresh host buffer to fault in). A set is
written here, in the background, the first time a worker packs it.

Each entry is two files under `$EXPERTLIB_CACHE/packed/`: `<key>.bin`, the rows' bytes (per MoE
layer, per part, the experts' rows in order), and `<key>.json`, its record: what the bytes are (the
set's content digest, the layout's digest, per layer its experts and the parts' dtypes and row
shapes) and the state of the data file right after it was written (device, inode, size, mtime_ns,
ctime_ns, like the registry's verified records: any write moves mtime and ctime, and ctime cannot be
set back by hand). A data file that is not in that state is never read into a slot: the entry is
removed and the set packed again from its checked file. The key hashes the content digest with the
layout (`layout_digest`: the packing code's format, the vLLM version and the kernel's own packing of
fixed probe rows, per layer shape), so another kernel, ISA or vLLM never reads another's bytes.

Bounded in bytes (`EXPERTLIB_PACKED_CACHE`: a size such as 32GiB, 0 turns it off; default a quarter
of the free disk space where it lives, at most 64 GiB), least recently used entries removed first (a
record's mtime is its last use).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError

from expertlib.constants import PACKED_CACHE_DIR, PACKED_CACHE_ENV
from expertlib.fsutil import atomic_write_text, cache_dir
from expertlib.verify import FileKey

log = logging.getLogger(__name__)

#: Default bound: a quarter of the free disk space where the cache lives, at most this.
DEFAULT_MAX = 64 << 30
DEFAULT_DISK_SHARE = 0.25
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PackedPart(BaseModel):
    name: str = Field(description="the slot tensor's part: w13, w2, b13 or b2")
    dtype: str
    row: list[int] = Field(description="the shape of one expert's row")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row, dtype=np.int64)) * _DTYPES[self.dtype].itemsize


class PackedLayer(BaseModel):
    layer: int
    experts: list[int]
    parts: list[PackedPart]

    @property
    def nbytes(self) -> int:
        return len(self.experts) * sum(p.row_bytes for p in self.parts)


class PackedRecord(BaseModel):
    """What one data file holds and the state it was written in."""

    key: str
    content_digest: str
    layout: str
    file: list[int] = Field(description="FileKey of the data file right after it was written")
    layers: list[PackedLayer]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def offsets(self) -> dict[tuple[int, str, int], tuple[int, PackedPart]]:
        """(layer, part, expert) -> (offset of its row in the data file, part)."""
        out, at = {}, 0
        for layer in self.layers:
            for part in layer.parts:
                for e in layer.experts:
                    out[(layer.layer, part.name, e)] = (at, part)
                    at += part.row_bytes
        return out


def budget_from_env(root: Path) -> int:
    """`EXPERTLIB_PACKED_CACHE` (a size; 0 turns the cache off), else the default bound."""
    from expertlib import sizing

    text = os.environ.get(PACKED_CACHE_ENV, "").strip()
    if text:
        try:
            return max(0, sizing.parse_size(text))
        except ValueError:
            log.warning(
                "%s=%r is not a size (e.g. 32GiB, 0 = off); the packed-set cache stays off",
                PACKED_CACHE_ENV,
                text,
            )
            return 0
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return 0
    return int(min(DEFAULT_MAX, free * DEFAULT_DISK_SHARE))


class PackedCache:
    """Packed sets on disk (see the module docstring). `root` and `budget` default to the cache
    folder and `EXPERTLIB_PACKED_CACHE`, read when first needed."""

    def __init__(self, root: str | Path | None = None, budget: int | None = None):
        self._root = Path(root) if root is not None else None
        self._budget = budget
        #: False: this process neither reads nor writes the cache (an engine whose every load is
        #: hashed, `--verify-loads always`); the entries stay for other processes
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self.refused = 0  # entries found changed and removed
        self.written = 0
        self._queue: queue.Queue | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = cache_dir() / PACKED_CACHE_DIR
        return self._root

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = budget_from_env(self.root)
        return self._budget

    def configure(self, root: str | Path | None = None, budget: int | None = None) -> None:
        """Point the cache elsewhere and/or bound it (bytes; 0 turns it off)."""
        self.flush()
        with self._lock:
            if root is not None:
                self._root = Path(root)
            if budget is not None:
                self._budget = int(budget)
        self._shrink()

    @staticmethod
    def key(content_digest: str, layout: str) -> str:
        return hashlib.sha256(f"{content_digest}\n{layout}".encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.bin", self.root / f"{key}.json"

    # --- reading ---------------------------------------------------------------------------------

    def record(self, content_digest: str, layout: str) -> PackedRecord | None:
        """The entry for this set and layout if there is one whose data file is as it was written;
        an entry found otherwise is removed (and counted in `refused`)."""
        if not self.enabled or self.budget <= 0:
            return None
        key = self.key(content_digest, layout)
        data, meta = self._paths(key)
        try:
            rec = PackedRecord.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValidationError, ValueError):
            rec = None
        if (
            rec is None
            or rec.key != key
            or rec.content_digest != content_digest
            or rec.layout != layout
            or any(p.dtype not in _DTYPES for layer in rec.layers for p in layer.parts)
            or FileKey.of(data) != tuple(rec.file)
            or rec.file[2] != rec.nbytes
        ):
            self.refuse(
                key, "its data file changed after it was written" if rec is not None else "unreadable record"
            )
            return None
        return rec

    def read_into(self, rec: PackedRecord, targets: Iterable[tuple[int, str, int, torch.Tensor]]) -> bool:
        """Read rows of `rec` straight into `targets`: (layer, part, expert, destination), each
        destination a contiguous CPU tensor of that row's dtype and shape. False (the entry removed)
        when the data file is not the one recorded, before or after the read: the destinations then
        hold no bytes to trust and must be written again."""
        where = rec.offsets()
        data, _ = self._paths(rec.key)
        try:
            fd = os.open(data, os.O_RDONLY)
        except OSError:
            self.refuse(rec.key, "its data file is gone")
            return False
        try:
            if _fkey(fd) != tuple(rec.file):
                self.refuse(rec.key, "its data file changed after it was written")
                return False
            for layer, part, expert, dst in targets:
                offset, info = where[(layer, part, expert)]
                if (
                    list(dst.shape) != info.row
                    or dst.dtype != _DTYPES[info.dtype]
                    or not dst.is_contiguous()
                    or dst.device.type != "cpu"
                ):
                    raise ValueError(f"packed row {layer}.{part}.{expert} does not fit its destination")
                _pread_into(fd, _bytes(dst), offset)
            if _fkey(fd) != tuple(rec.file):  # written to while it was read
                self.refuse(rec.key, "its data file changed while it was read")
                return False
        finally:
            os.close(fd)
        self.hits += 1
        with contextlib.suppress(OSError):  # the record's mtime is the entry's last use
            os.utime(self._paths(rec.key)[1])
        return True

    def refuse(self, key: str, why: str) -> None:
        log.warning("packed-set cache entry %s refused (%s): removed, the set is packed again", key[:12], why)
        self.refused += 1
        self._remove(key)

    def _remove(self, key: str) -> None:
        for p in (*self._paths(key), self._lock_path(key)):
            with contextlib.suppress(OSError):
                p.unlink()

    # --- writing ---------------------------------------------------------------------------------

    def save_later(
        self,
        content_digest: str,
        layout: str,
        layers: list[tuple[int, list[int], list[tuple[str, torch.Tensor]]]],
    ) -> None:
        """Write a packed set in the background (one writer thread; dropped when two writes are
        already waiting: it is a cache). `layers`: (layer, experts, [(part, rows (n, *row))])."""
        if not self.enabled or self.budget <= 0:
            return
        size = sum(t.numel() * t.element_size() for _, _, parts in layers for _, t in parts)
        if size > self.budget:
            return
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=2)
                threading.Thread(target=self._writer, name="expertlib-packed-cache", daemon=True).start()
            q = self._queue
        with contextlib.suppress(queue.Full):
            q.put_nowait((content_digest, layout, layers))

    def flush(self) -> None:
        """Wait until the writes asked for so far are done."""
        if self._queue is not None:
            self._queue.join()

    def _writer(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                self.save(*item)
            except Exception as exc:  # a cache that cannot be written is no error, only slower later
                log.warning("could not write the packed-set cache: %s", exc)
            finally:
                self._queue.task_done()

    def save(
        self,
        content_digest: str,
        layout: str,
        layers: list[tuple[int, list[int], list[tuple[str, torch.Tensor]]]],
    ) -> PackedRecord | None:
        """Write a packed set now (`save_later`'s work): the data file (fsynced, then renamed into
        place), then its record with the data file's state, then the bound enforced."""
        with self.writer(content_digest, layout) as w:
            for layer, experts, parts in layers:
                w.add(layer, experts, parts)
            return w.commit()

    def used(self) -> int:
        """Bytes of the data files on disk now."""
        total = 0
        for p in self.root.glob("*.bin") if self.root.is_dir() else ():
            with contextlib.suppress(OSError):  # removed meanwhile
                total += p.stat().st_size
        return total

    def free(self) -> int:
        """Bytes the bound leaves unused now (nothing would be removed to write this much)."""
        return max(0, self.budget - self.used())

    def holds(self, content_digest: str, layout: str) -> bool:
        """Whether an entry for this set and layout is on disk (its record not read nor checked: what
        `record` checks when a load reads it); counts nothing."""
        return self.enabled and self._paths(self.key(content_digest, layout))[1].exists()

    def claim(self, content_digest: str, layout: str) -> BinaryIO | None:
        """This process's exclusive claim on packing this entry ahead of any request (`flock` on a lock
        file beside it), or None while another process holds it: replicas of a server share the cache
        and pack each set once. Closing the returned file gives the claim up."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self._lock_path(self.key(content_digest, layout)), "a+b")  # noqa: SIM115 - returned
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return None
        return f

    def _lock_path(self, key: str) -> Path:
        return self.root / f".{key}.lock"

    def writer(self, content_digest: str, layout: str) -> PackedWriter:
        """A packed set written layer by layer (`PackedWriter`), so one layer's rows are in memory
        at a time."""
        return PackedWriter(self, content_digest, layout)

    def _shrink(self, keep: str | None = None) -> None:
        """Remove least recently used entries until the cache fits its bound (`keep` last), and data
        files without a record."""
        root = self.root
        if not root.is_dir():
            return
        budget = self.budget
        entries = []
        for meta in root.glob("*.json"):
            key = meta.stem
            try:
                used = meta.stat().st_mtime_ns
                size = (root / f"{key}.bin").stat().st_size
            except OSError:
                self._remove(key)
                continue
            entries.append((key == keep, used, key, size))
        for data in root.glob("*.bin"):
            if not (root / f"{data.stem}.json").exists():
                with contextlib.suppress(OSError):
                    data.unlink()
        total = sum(size for *_, size in entries)
        for _, _, key, size in sorted(entries):
            if total <= budget:
                break
            self._remove(key)
            total -= size

    def status(self) -> dict[str, Any]:
        root = self.root
        sizes = [p.stat().st_size for p in root.glob("*.bin")] if root.is_dir() else []
        return {
            "enabled": self.enabled,
            "budget": self.budget,
            "bytes": sum(sizes),
            "entries": len(sizes),
            "hits": self.hits,
            "misses": self.misses,
            "refused": self.refused,
            "written": self.written,
        }


class PackedWriter:
    """One entry written layer by layer: `add` appends a layer's rows to a temporary data file,
    `commit` fsyncs it, renames it into place and writes its record; leaving the `with` block without
    a commit removes the temporary file."""

    def __init__(self, cache: PackedCache, content_digest: str, layout: str):
        self.cache, self.content_digest, self.layout = cache, content_digest, layout
        self.key = cache.key(content_digest, layout)
        self.layers: list[PackedLayer] = []
        cache.root.mkdir(parents=True, exist_ok=True)
        self._tmp = cache.root / f".{self.key}.{os.getpid()}.{threading.get_ident()}.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by commit or __exit__
        self.nbytes = 0

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def add(self, layer: int, experts: list[int], parts: list[tuple[str, torch.Tensor]]) -> None:
        """Append one MoE layer: `parts` = [(part, rows (n, *row))], row i for `experts[i]`."""
        infos = []
        for name, t in parts:
            if t.shape[0] != len(experts):
                raise ValueError(f"layer {layer} part {name}: {t.shape[0]} rows for {len(experts)} experts")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise ValueError(f"packed rows of dtype {dtype} are not cached")
            infos.append(PackedPart(name=name, dtype=dtype, row=list(t.shape[1:])))
        for _, t in parts:
            data = _bytes(t.contiguous())
            self._file.write(memoryview(data))
            self.nbytes += data.size
        self.layers.append(PackedLayer(layer=int(layer), experts=[int(e) for e in experts], parts=infos))

    def commit(self, *, evict: bool = True) -> PackedRecord | None:
        """Put the entry in place. `evict=False` (a set packed ahead of any request): the entry is
        kept only if it fits the bound's free space as it is, never at the cost of another entry
        (None then, nothing left behind)."""
        cache = self.cache
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not evict and self.nbytes > cache.free():
            return None
        data, meta = cache._paths(self.key)
        os.replace(self._tmp, data)
        state = FileKey.of(data)
        if state is None:
            return None
        rec = PackedRecord(
            key=self.key,
            content_digest=self.content_digest,
            layout=self.layout,
            file=list(state),
            layers=self.layers,
        )
        if state.size != rec.nbytes:
            cache._remove(self.key)
            return None
        atomic_write_text(meta, rec.model_dump_json())
        cache.written += 1
        if evict:
            cache._shrink(keep=self.key)
        elif cache.used() > cache.budget:
            cache._remove(self.key)  # another process filled the room meanwhile
            return None
        return rec


def _fkey(fd: int) -> tuple:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def _pread_into(fd: int, dst: np.ndarray, offset: int) -> None:
    view, done = memoryview(dst), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError("the packed-set cache file ended early")
        done += n


def digest_rows(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 over tensors' bytes (the layout probe's)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(_bytes(t.contiguous())))
    return h.hexdigest()


def layout_digest(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()


#: This process's cache (each vLLM worker process has its own handle on the shared folder).
PACKED_CACHE = PackedCache()

__all__ = ["PACKED_CACHE", "PackedCache", "PackedRecord", "PackedWriter", "digest_rows", "layout_digest"]
