"""Checking an expert set's tensors: one threaded pass over the bytes, then trusted while unchanged.

One pass computes everything a load needs: the content digest, every expert's digest, and each
tensor's largest magnitude (max |w|, which is NaN or inf when the tensor holds such values; the
weight-bound check reads it too). Tensors are hashed on a thread pool (the hashes and torch release
the GIL), straight from a memory map of the file, so reading overlaps hashing.

    scan = scan_tensors(tensors, manifest)         # a Scan: content_digest, expert_digests, absmax
    check_scan(scan, manifest, where)              # DigestMismatchError / NonFiniteWeightsError

A file that passed is trusted while its `FileKey` (device, inode, size, mtime_ns, ctime_ns) stays
the same: a process remembers the files it checked (`remember`, `recall`), and the registry keeps a
`VerifiedRecord` per blob it checked at ingest. Any change to the file (its ctime cannot be set back
by hand) means a full check again.

Digest schemes, by patch format version:
  1  content digest: one sha256 over (name, dtype, shape, bytes) of every tensor in name order;
     expert digest: sha256 of the expert's parts as float32 bytes (`expertlib.moe.expert_digest`).
  2  a tree: every tensor's bytes get their own sha256 (a leaf, computed in parallel); the content
     digest is the sha256 of the lines "name|dtype|shape|leaf" in name order, an expert's digest the
     sha256 of the lines "part|dtype|shape|leaf" of its parts in canonical order.
  3  the same; a registry addresses the file by a tree over the same leaves (`blob_digest`).
  4  the same trees with BLAKE3 in place of sha256 everywhere (leaves, trees, the address; digests
     read "blake3:<64 hex>"): 2.5x less CPU per byte than sha256 with the SHA extensions, which is
     what publish, pull and a first load spend their time on. Older files keep their sha256 digests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Protocol

import blake3
import numpy as np
import torch
from pydantic import BaseModel, Field

from expertlib.constants import EXPERT_KEY, MANIFEST_METADATA_KEY
from expertlib.errors import DigestMismatchError, NonFiniteWeightsError, PatchCorruptError
from expertlib.moe import BIAS_PARTS, EXPERT_PARTS, expert_digest


class ExpertSetManifest(Protocol):
    """What a scan reads of a manifest (`expertlib.patch.ExpertSetManifest`, which imports this
    module: named here by its shape, so the import runs one way)."""

    format_version: int
    content_digest: str
    expert_digests: dict[str, str]

    def pairs(self) -> list[tuple[int, int]]: ...


class _Layout(NamedTuple):
    """The part of a manifest `digests_of` needs before the manifest exists."""

    format_version: int
    experts: Mapping[int, list[int]]

    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, ids in sorted(self.experts.items()) for e in ids]


#: Patch format whose digests are trees of per-tensor leaves (see the module docstring).
TREE_FORMAT = 2
#: Patch format from which every digest is BLAKE3 instead of sha256.
BLAKE3_FORMAT = 4


def hash_of(format_version: int | None) -> tuple[str, Callable]:
    """(name, constructor) of the hash a patch of `format_version` is digested with; None (bytes that
    are no patch) and formats before `BLAKE3_FORMAT`: sha256. A digest reads "<name>:<hex>"."""
    if format_version is not None and format_version >= BLAKE3_FORMAT:
        return "blake3", blake3.blake3
    return "sha256", hashlib.sha256


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


class FileKey(NamedTuple):
    """What identifies one unchanged file: any write moves mtime and ctime, a rename or a copy the
    inode, and ctime cannot be set back by hand (os.utime sets mtime only, and moves ctime)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> FileKey | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Scan(BaseModel):
    """What one pass over a set's tensors found."""

    content_digest: str = Field(description="recomputed content digest")
    expert_digests: dict[str, str] = Field(description="'l.e' -> recomputed digest of that expert")
    absmax: dict[str, float] = Field(
        description="tensor name -> max |w| (NaN or inf if it holds such values)"
    )

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.absmax.values())


class VerifiedRecord(BaseModel):
    """A file that passed a full check, and the state it was in then."""

    path: str = Field(description="the file's resolved path")
    key: list[int] = Field(description="FileKey fields when it was checked")
    scan: Scan

    def matches(self, path: str | Path, content_digest: str) -> bool:
        key = FileKey.of(path)
        return (
            key is not None
            and list(key) == self.key
            and self.path == str(Path(path).resolve())
            and self.scan.content_digest == content_digest
        )


def threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# --- the pass ----------------------------------------------------------------------------------------


def _bytes_of(t: torch.Tensor):
    """The tensor's raw bytes without a copy (a copy only when it is not contiguous)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _absmax(t: torch.Tensor) -> float:
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))  # NaN when the tensor holds a NaN; inf shows as such
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _leaf(name: str, t: torch.Tensor, new: Callable) -> tuple[str, str, float]:
    return name, new(_bytes_of(t)).hexdigest(), _absmax(t)


def _expert_names(layer: int, expert: int, tensors: Mapping[str, object]) -> list[tuple[str, str]]:
    names = [(p, EXPERT_KEY.format(layer=layer, expert=expert, part=p)) for p in (*EXPERT_PARTS, *BIAS_PARTS)]
    return [(p, n) for p, n in names if n in tensors]


def scan_tensors(
    tensors: Mapping[str, torch.Tensor],
    manifest: ExpertSetManifest,
    *,
    pool: ThreadPoolExecutor | None = None,
) -> Scan:
    """One pass over `tensors` in the digest scheme of `manifest`'s format version."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(threads(), thread_name_prefix="expertlib-verify")
    try:
        if manifest.format_version >= TREE_FORMAT:
            return _scan_tree(tensors, manifest, pool)
        return _scan_flat(tensors, manifest, pool)
    finally:
        if own:
            pool.shutdown()


def _scan_tree(tensors: Mapping[str, torch.Tensor], m: ExpertSetManifest, pool: ThreadPoolExecutor) -> Scan:
    leaves, absmax = {}, {}
    new = hash_of(m.format_version)[1]
    for name, leaf, amax in pool.map(lambda kv: _leaf(*kv, new), tensors.items()):
        leaves[name], absmax[name] = leaf, amax
    meta = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    return tree_scan(leaves, meta, absmax, m)


def tree_scan(
    leaves: Mapping[str, str],
    meta: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    absmax: Mapping[str, float],
    m: ExpertSetManifest,
) -> Scan:
    """The tree digests (format 2 on) from each tensor's leaf (the hash of its bytes) and (dtype, shape)."""
    label, new = hash_of(m.format_version)

    def line(name: str, label: str) -> bytes:
        dtype, shape = meta[name]
        return f"{label}|{str(dtype).removeprefix('torch.')}|{tuple(shape)}|{leaves[name]}\n".encode()

    content = new(b"".join(line(n, n) for n in sorted(leaves)))
    experts = {}
    for layer, e in m.pairs():
        parts = _expert_names(layer, e, leaves)
        h = new(b"".join(line(n, p) for p, n in parts))
        experts[f"{layer}.{e}"] = f"{label}:{h.hexdigest()}"
    return Scan(content_digest=f"{label}:{content.hexdigest()}", expert_digests=experts, absmax=dict(absmax))


def _scan_flat(tensors: Mapping[str, torch.Tensor], m: ExpertSetManifest, pool: ThreadPoolExecutor) -> Scan:
    """Format 1: the one serial content hash runs beside the float32 expert digests and the maxima."""
    from expertlib.moe import ExpertWeights

    def content() -> str:
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}|{_dtype_name(t)}|{tuple(t.shape)}\n".encode())
            h.update(_bytes_of(t))
        return "sha256:" + h.hexdigest()

    def expert(pair: tuple[int, int]) -> tuple[str, str]:
        w = ExpertWeights(**{p: tensors[n] for p, n in _expert_names(*pair, tensors)})
        return f"{pair[0]}.{pair[1]}", expert_digest(w)

    whole = pool.submit(content)
    absmax = dict(zip(tensors, pool.map(_absmax, tensors.values()), strict=True))
    experts = dict(pool.map(expert, m.pairs()))
    return Scan(content_digest=whole.result(), expert_digests=experts, absmax=absmax)


def digests_of(
    tensors: Mapping[str, torch.Tensor], experts: Mapping[int, list[int]], format_version: int
) -> Scan:
    """The digests `ExpertSet.build` writes into a manifest of `format_version`, in one pass."""
    return scan_tensors(tensors, _Layout(format_version, dict(experts)))


def check_scan(scan: Scan, m: ExpertSetManifest, where: str | None) -> None:
    """Refuse a set whose bytes disagree with its manifest or hold NaN/inf."""
    if scan.content_digest != m.content_digest:
        raise DigestMismatchError(
            f"content digest {scan.content_digest[:19]}... does not match the manifest's {m.content_digest[:19]}...",
            path=where,
            hint="the file was altered or damaged after it was written; pull or re-export it",
        )
    for name, v in scan.absmax.items():
        if not math.isfinite(v):
            raise NonFiniteWeightsError(
                f"tensor {name} holds NaN or infinite values",
                path=where,
                hint="the training run diverged; retrain (lower the learning rate) and export again",
            )
    forged = sorted(k for k, d in scan.expert_digests.items() if m.expert_digests.get(k) != d)
    if forged:
        raise DigestMismatchError(
            f"the manifest's digests of experts {forged[:5]} do not match their tensors",
            path=where,
            hint="the manifest was edited by hand or forged; do not use this file, re-export the set",
        )


# --- reading a file without copying -------------------------------------------------------------------

_REPUBLISH = "the file is damaged: re-export or pull the expert set again"


def map_tensors(
    path: str | Path, expected: Mapping[str, tuple[torch.dtype, list[int]]]
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views on a private memory map of it (no copy).

    `expected` (name -> dtype, shape) is what the manifest promises; the header found in the file
    must say exactly that, so a file swapped after it was opened cannot smuggle other tensors in."""
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as exc:  # an empty file
            raise PatchCorruptError("empty file", path=str(path), hint=_REPUBLISH) from exc
    if hasattr(mmap, "MADV_WILLNEED"):
        mm.madvise(mmap.MADV_WILLNEED)  # the kernel reads ahead while the first tensors are hashed
    return tensor_views(mm, expected, str(path))


def read_tensors(
    path: str | Path, expected: Mapping[str, tuple[torch.dtype, list[int]]], scratch=None
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read into one buffer in host memory (each byte read once),
    as views on it; checked against `expected` like `map_tensors`. `scratch(size)`: where that buffer
    comes from (a reused one), else a fresh array."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = _buffer(size, scratch)  # not zero-filled first: the read is the one pass
        view, done = memoryview(buf), 0
        while done < size:
            n = f.readinto(view[done : done + (64 << 20)])
            if not n:
                raise PatchCorruptError("the file shrank while it was read", path=str(path), hint=_REPUBLISH)
            done += n
    return tensor_views(buf, expected, str(path))


def read_scanned(
    path: str | Path,
    manifest: ExpertSetManifest,
    expected: Mapping[str, tuple[torch.dtype, list[int]]],
    scratch=None,
) -> tuple[dict[str, torch.Tensor], Scan]:
    """`read_tensors` and `scan_tensors` overlapped: the file is read into one buffer in pieces, and
    each tensor is hashed on the thread pool as soon as the read has passed its last byte, so the
    hashing of the first tensors runs while the rest is read (format 2 and later; a format 1 file
    is read, then scanned)."""
    if manifest.format_version < TREE_FORMAT:
        tensors = read_tensors(path, expected, scratch)
        return tensors, scan_tensors(tensors, manifest)
    with (
        open(path, "rb") as f,
        ThreadPoolExecutor(threads(), thread_name_prefix="expertlib-verify") as pool,
    ):
        size = os.fstat(f.fileno()).st_size
        buf = _buffer(size, scratch)  # not zero-filled first: the read is the one pass
        view, done = memoryview(buf), 0

        def read_to(end: int) -> None:
            nonlocal done
            while done < end:
                n = f.readinto(view[done : min(end, done + (8 << 20))])
                if not n:
                    raise PatchCorruptError(
                        "the file shrank while it was read", path=str(path), hint=_REPUBLISH
                    )
                done += n

        read_to(min(size, 8))
        n = struct.unpack("<Q", bytes(buf[:8]))[0] if size >= 8 else 0
        read_to(min(size, 8 + n) if n <= size else size)
        tensors = tensor_views(buf, expected, str(path))  # checks the header against the manifest
        by_end = sorted(tensors, key=lambda k: tensors[k].data_ptr() + tensors[k].nbytes)
        base, futures, new = buf.ctypes.data, [], hash_of(manifest.format_version)[1]
        for name in by_end:
            t = tensors[name]
            read_to(t.data_ptr() - base + t.nbytes if t.numel() else done)
            futures.append(pool.submit(_leaf, name, t, new))
        read_to(size)
        leaves, absmax = {}, {}
        for fut in futures:
            name, leaf, amax = fut.result()
            leaves[name], absmax[name] = leaf, amax
    meta = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return tensors, tree_scan(leaves, meta, absmax, manifest)


def _buffer(size: int, scratch=None) -> np.ndarray:
    """`size` bytes to read a file into: from `scratch(size)` (None: it has none that big) or fresh."""
    buf = scratch(size) if scratch is not None else None
    return buf if buf is not None else np.empty(size, dtype=np.uint8)


def tensor_views(
    buf, expected: Mapping[str, tuple[torch.dtype, list[int]]], where: str
) -> dict[str, torch.Tensor]:
    """Views of the tensors in the safetensors bytes `buf` (a writable buffer), after checking its
    header against `expected`."""
    total = len(buf)
    n = struct.unpack("<Q", bytes(buf[:8]))[0] if total >= 8 else -1
    try:
        header = json.loads(bytes(buf[8 : 8 + n])) if 0 < n <= total - 8 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise PatchCorruptError("unreadable safetensors header", path=where, hint=_REPUBLISH)
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        raise PatchCorruptError("the file's tensors changed after it was opened", path=where, hint=_REPUBLISH)
    start, out = 8 + n, {}
    for name, (dtype, shape) in expected.items():
        info = header[name]
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        a, b = offsets if isinstance(offsets, list) and len(offsets) == 2 else (0, -1)
        size = math.prod(shape) * dtype.itemsize
        if (
            not isinstance(info, dict)
            or _DTYPES.get(info.get("dtype")) != dtype
            or list(info.get("shape", ())) != list(shape)
            or b - a != size
            or a < 0
            or start + b > total
        ):
            raise PatchCorruptError(
                f"{name}: header disagrees with the manifest", path=where, hint=_REPUBLISH
            )
        flat = (
            torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=start + a)
            if size
            else torch.empty(0, dtype=torch.uint8)
        )
        out[name] = flat.view(dtype).reshape(shape)
    return out


# --- files checked in this process ---------------------------------------------------------------------

#: Files that passed a full check here, by (resolved path, FileKey, content digest).
_CHECKED: OrderedDict[tuple, Scan] = OrderedDict()
_CHECKED_MAX = 1024


def _memo_key(path: str | Path, key: FileKey, content: str) -> tuple:
    return (str(Path(path).resolve()), *key, content)


def recall(path: str | Path, content: str) -> Scan | None:
    """The scan of a file this process checked, if the file is unchanged since (same FileKey)."""
    key = FileKey.of(path)
    if key is None:
        return None
    scan = _CHECKED.get(_memo_key(path, key, content))
    if scan is not None:
        _CHECKED.move_to_end(_memo_key(path, key, content))
    return scan


def remember(path: str | Path, key: FileKey, scan: Scan) -> None:
    _CHECKED[_memo_key(path, key, scan.content_digest)] = scan
    while len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)


def scan_file(
    path: str | Path,
    manifest: ExpertSetManifest,
    expected: Mapping[str, tuple[torch.dtype, list[int]]],
    *,
    on_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> tuple[Scan, FileKey | None]:
    """A full pass over the file at `path`; returns the scan and the FileKey the file had throughout
    (None when it changed during the pass: then nothing may be remembered about it)."""
    before = FileKey.of(path)
    tensors = map_tensors(path, expected)
    scan = scan_tensors(tensors, manifest)
    if on_tensors is not None:
        on_tensors(tensors)
    after = FileKey.of(path)
    return scan, (before if before == after else None)


# --- checking bytes while they stream past (a copy into the registry, a download) ------------------------

#: dtype -> (unsigned view, sign mask, bit pattern of inf, signed view): for IEEE floats a larger
#: pattern without the sign bit is a larger magnitude, and every pattern above inf's is a NaN
_BITS = {
    torch.float64: (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, torch.int64),
    torch.float32: (np.uint32, 0x7FFF_FFFF, 0x7F80_0000, torch.int32),
    torch.float16: (np.uint16, 0x7FFF, 0x7C00, torch.int16),
    torch.bfloat16: (np.uint16, 0x7FFF, 0x7F80, torch.int16),
}

#: chunks a stream may run ahead of its hashing threads (bounds the memory held)
_AHEAD = 8


def _peak_bits(data, dtype: torch.dtype) -> int:
    """The largest magnitude's bit pattern among the whole elements of `data` (bytes-like).

    Two reductions over the bytes in place, no temporary (masking off the sign into a new array
    cost twice as much): the unsigned maximum is, when any element has its sign bit set, the sign
    bit plus the largest negative magnitude; the signed maximum, when not negative, is the largest
    non-negative element's pattern, which is its magnitude."""
    view, mask, _, _ = _BITS[dtype]
    a = np.frombuffer(data, dtype=view)
    if not a.size:
        return 0
    top, sign = int(a.max()), mask + 1
    signed = int(a.view(np.dtype(view).str.replace("u", "i")).max())
    return max(top - sign if top >= sign else top, signed if signed >= 0 else 0)


def _bits_value(bits: int, dtype: torch.dtype) -> float:
    _, _, inf, signed = _BITS[dtype]
    if bits > inf:
        return math.nan
    return float(torch.tensor([bits], dtype=signed).view(dtype)[0])


class StreamScan:
    """What a check needs, computed while a safetensors file's bytes stream past once: the file's
    address in a registry (`digest`) and, per tensor, its leaf (the hash of its bytes that its format
    names, `hash_of`) and max |w|, i.e. a tree `Scan`. The work runs on two threads (the hashes and
    numpy release the GIL), so it overlaps the copy that feeds it. For a patch of format
    `BLOB_TREE_FORMAT` or later the address is a tree over the same leaves (`blob_digest`), so every
    byte is hashed once, the tensors split between the two threads; for older files it is the sha256
    of the whole file, on its own thread.

        stream = StreamScan()
        for chunk in chunks:
            stream.update(chunk)                # then write the chunk
        digest = stream.digest()                # the file's address, "blake3:..." (older: "sha256:...")
        scan = stream.scan(manifest)            # None when the bytes were no tree-format patch
    """

    def __init__(self) -> None:
        self._pos = 0
        self._head = bytearray()
        self._early: list[tuple[object, int]] = []  # chunks that came before the header was whole
        self._tree: bool | None = None  # the address is a tree (None: not known yet)
        self._whole: hashlib._Hash | None = None  # the sha256 of every byte, when the address is that
        self._header_end = 0
        self._header_leaf = ""
        self._label, self._new = hash_of(None)  # the tree's hash, once the header named the format
        # (start, end, key, owner thread) in the file, by start; key: a tensor name, or the int start
        # of bytes between or after the tensors (None for the end: whatever follows the last tensor)
        self._segments: list[tuple[int, int | None, str | int, int]] = []
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._leaves: dict[str | int, object] = {}
        self._peaks: dict[str, int] = {}
        self._carry: dict[str, bytes] = {}
        self._bad = False
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix="expertlib-stream") for _ in range(2)]
        self._pending: list = []
        self._done = False

    def update(self, chunk) -> None:
        """Take the next bytes of the file (a bytes-like object the caller no longer changes)."""
        offset, self._pos = self._pos, self._pos + len(chunk)
        if self._tree is None:
            self._early.append((chunk, offset))
            if not self._read_header():
                return
            early, self._early = self._early, []
            for c, o in early:
                self._dispatch(c, o)
            return
        self._dispatch(chunk, offset)

    def _dispatch(self, chunk, offset: int) -> None:
        if self._whole is not None:
            self._pending.append(self._pools[0].submit(self._whole.update, chunk))
        if not self._bad:
            for i in (0, 1) if self._tree else (1,):
                self._pending.append(self._pools[i].submit(self._tensors, i, chunk, offset))
        while len(self._pending) > 2 * _AHEAD:
            self._pending.pop(0).result()

    def _finish(self) -> None:
        if self._done:
            return
        if self._tree is None:  # the bytes ended before a whole header: an address over every byte
            self._plain()
            early, self._early = self._early, []
            for c, o in early:
                self._dispatch(c, o)
        try:
            for f in self._pending:
                f.result()
        finally:
            for p in self._pools:
                p.shutdown()
            self._pending, self._done = [], True

    @property
    def size(self) -> int:
        return self._pos

    def digest(self) -> str:
        """The address of the bytes seen: `blob_digest` of a file holding them."""
        self._finish()
        if not self._tree:
            return "sha256:" + self._whole.hexdigest()
        lines = [_BLOB_TREE_TAG, f"header|0|{self._header_end}|{self._header_leaf}\n".encode()]
        for a, b, key, _ in self._segments:
            end = self._pos if b is None else min(b, self._pos)
            if b is None and end <= a:
                continue  # nothing after the last tensor
            kind = "tensor" if isinstance(key, str) else "bytes"
            lines.append(f"{kind}|{a}|{end}|{self._leaves[key].hexdigest()}\n".encode())
        return f"{self._label}:{self._new(b''.join(lines)).hexdigest()}"

    def scan(self, manifest: ExpertSetManifest) -> Scan | None:
        """The format-2 scan of the bytes seen, or None (another format, or bytes that are no
        well-formed safetensors file: then the file must be checked the ordinary way)."""
        self._finish()
        if self._bad or not self._segments and not self._meta or manifest.format_version < TREE_FORMAT:
            return None
        tensors = [(a, b) for a, b, key, _ in self._segments if isinstance(key, str)]
        if tensors and self._pos < tensors[-1][1]:
            return None
        leaves = {n: self._leaves[n].hexdigest() for n in self._meta}
        absmax = {
            n: _bits_value(self._peaks[n], dtype) if dtype in _BITS else 0.0
            for n, (dtype, _) in self._meta.items()
        }
        return tree_scan(leaves, self._meta, absmax, manifest)

    # --- the header, on the caller's thread ---

    def _plain(self) -> None:
        self._tree, self._bad, self._whole = False, True, hashlib.sha256()
        self._label, self._new = hash_of(None)

    def _read_header(self) -> bool:
        """Once the header has arrived: decide the address scheme and lay out the segments. False
        while the header is still incomplete."""
        if not self._head_bytes(8):
            return False
        n = struct.unpack("<Q", bytes(self._head[:8]))[0]
        if n > _MAX_HEADER:
            self._plain()
            return True
        if not self._head_bytes(8 + n):
            return False
        try:
            self._layout()
        except Exception:  # no well-formed safetensors file: its address is the sha256 of its bytes
            self._segments, self._meta, self._leaves = [], {}, {}
            self._plain()
        return True

    def _head_bytes(self, need: int) -> bool:
        """Gather the file's first `need` bytes from the chunks seen so far."""
        for c, o in self._early:
            have = len(self._head)
            if have >= need:
                break
            if o + len(c) > have:
                self._head += memoryview(c)[have - o : need - o]
        return len(self._head) >= need

    def _layout(self) -> None:
        from expertlib import jsonsafe

        n = struct.unpack("<Q", bytes(self._head[:8]))[0]
        header = jsonsafe.loads(bytes(self._head[8 : 8 + n]))
        if not isinstance(header, dict):
            raise ValueError("no header")
        fmt = declared_format(header.pop("__metadata__", None))
        spans = []
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
            if not 0 <= a <= b or b - a != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"bad offsets for {name}")
            spans.append((8 + n + a, 8 + n + b, name))
            self._meta[name] = (dtype, shape)
            self._peaks[name] = 0
        spans.sort()
        if any(p[1] > q[0] for p, q in itertools.pairwise(spans)):
            raise ValueError("overlapping tensors")
        self._tree = fmt is not None and fmt >= BLOB_TREE_FORMAT
        if not self._tree:
            self._whole = hashlib.sha256()
        self._label, self._new = hash_of(fmt)
        self._header_end = 8 + n
        self._header_leaf = self._new(self._head).hexdigest()
        load, at = [0, 0], 8 + n  # bytes given to each thread; the position reached
        for a, b, name in spans:
            if a > at:  # bytes no tensor claims: hashed too, so the address covers every byte
                self._segments.append((at, a, at, 0))
            owner = 1 if not self._tree or load[1] < load[0] else 0
            load[owner] += b - a
            self._segments.append((a, b, name, owner))
            at = b
        self._segments.append((at, None, at, 0))
        for _, _, key, _ in self._segments:
            self._leaves[key] = self._new()

    # --- on the hashing threads ---

    def _tensors(self, thread: int, chunk, offset: int) -> None:
        view = memoryview(chunk)
        end = offset + len(chunk)
        for a, b, key, owner in self._segments:
            if owner != thread or (b is not None and b <= offset):
                continue
            if a >= end:
                break
            piece = view[max(a, offset) - offset : (end if b is None else min(b, end)) - offset]
            if not len(piece):
                continue
            self._leaves[key].update(piece)
            dtype = self._meta[key][0] if isinstance(key, str) else None
            if dtype in _BITS:
                self._peak(key, piece, dtype)

    def _peak(self, name: str, piece: memoryview, dtype: torch.dtype) -> None:
        size = dtype.itemsize
        carry = self._carry.pop(name, b"")
        if carry:  # an element cut by the previous chunk's end
            k = min(size - len(carry), len(piece))
            carry += bytes(piece[:k])
            piece = piece[k:]
            if len(carry) < size:
                self._carry[name] = carry
                return
            self._peaks[name] = max(self._peaks[name], _peak_bits(carry, dtype))
        whole = len(piece) - len(piece) % size
        if whole:
            self._peaks[name] = max(self._peaks[name], _peak_bits(piece[:whole], dtype))
        if whole < len(piece):
            self._carry[name] = bytes(piece[whole:])


def declared_format(metadata) -> int | None:
    """The patch format version a safetensors header's metadata declares (None: none, or unreadable)."""
    from expertlib import jsonsafe

    raw = metadata.get(MANIFEST_METADATA_KEY) if isinstance(metadata, dict) else None
    try:
        manifest = (
            jsonsafe.loads(raw, max_depth=jsonsafe.MAX_MANIFEST_DEPTH) if isinstance(raw, str) else None
        )
    except ValueError:
        return None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def blob_digest(chunks) -> str:
    """The registry address of a file's bytes (`chunks`: the file, piece by piece). For a patch of
    format `BLOB_TREE_FORMAT` or later: the hash its format names (`hash_of`: BLAKE3 from format 4,
    sha256 before) of the lines

        expertlib blob tree 1
        header|0|<end>|<hash of the 8-byte length and the header>
        tensor|<start>|<end>|<hash of the tensor's bytes>      one per tensor, by position
        bytes|<start>|<end>|<hash>                             bytes no tensor claims, if any

    whose tensor leaves are those of the content digest (one hash pass gives both); for anything
    else the sha256 of the whole file."""
    stream = StreamScan()
    for chunk in chunks:
        stream.update(chunk)
    return stream.digest()


#: Patch format from which a registry blob's address is the tree of `blob_digest`.
BLOB_TREE_FORMAT = 3
_BLOB_TREE_TAG = b"expertlib blob tree 1\n"


#: the largest safetensors header a stream accepts (the format's own limit)
_MAX_HEADER = 100_000_000
