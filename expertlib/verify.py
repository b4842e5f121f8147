"""Checking an expert set's tensors: one threaded pass over the bytes, then trusted while unchanged.

One pass computes everything a load needs: the content digest, every expert's digest, and each
tensor's largest magnitude (max |w|, which is NaN or inf when the tensor holds such values; the
weight-bound check reads it too). Tensors are hashed on a thread pool (hashlib and torch release
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

import numpy as np
import torch
from pydantic import BaseModel, Field

from expertlib.constants import EXPERT_KEY
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


#: Patch format whose digests are trees of per-tensor sha256 leaves (see the module docstring).
TREE_FORMAT = 2

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


def _leaf(name: str, t: torch.Tensor) -> tuple[str, str, float]:
    return name, hashlib.sha256(_bytes_of(t)).hexdigest(), _absmax(t)


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
    for name, leaf, amax in pool.map(lambda kv: _leaf(*kv), tensors.items()):
        leaves[name], absmax[name] = leaf, amax
    meta = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    return tree_scan(leaves, meta, absmax, m)


def tree_scan(
    leaves: Mapping[str, str],
    meta: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    absmax: Mapping[str, float],
    m: ExpertSetManifest,
) -> Scan:
    """The format-2 digests from each tensor's leaf (sha256 of its bytes) and (dtype, shape)."""

    def line(name: str, label: str) -> bytes:
        dtype, shape = meta[name]
        return f"{label}|{str(dtype).removeprefix('torch.')}|{tuple(shape)}|{leaves[name]}\n".encode()

    content = hashlib.sha256(b"".join(line(n, n) for n in sorted(leaves)))
    experts = {}
    for layer, e in m.pairs():
        parts = _expert_names(layer, e, leaves)
        h = hashlib.sha256(b"".join(line(n, p) for p, n in parts))
        experts[f"{layer}.{e}"] = "sha256:" + h.hexdigest()
    return Scan(content_digest="sha256:" + content.hexdigest(), expert_digests=experts, absmax=dict(absmax))


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
    path: str | Path, expected: Mapping[str, tuple[torch.dtype, list[int]]]
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file read into one buffer in host memory (each byte read once),
    as views on it; checked against `expected` like `map_tensors`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(size, dtype=np.uint8)  # not zero-filled first: the read is the one pass
        view, done = memoryview(buf), 0
        while done < size:
            n = f.readinto(view[done : done + (64 << 20)])
            if not n:
                raise PatchCorruptError("the file shrank while it was read", path=str(path), hint=_REPUBLISH)
            done += n
    return tensor_views(buf, expected, str(path))


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
    """The largest magnitude's bit pattern among the whole elements of `data` (bytes-like)."""
    view, mask, _, _ = _BITS[dtype]
    a = np.frombuffer(data, dtype=view)
    return int(np.max(a & view(mask))) if a.size else 0


def _bits_value(bits: int, dtype: torch.dtype) -> float:
    _, _, inf, signed = _BITS[dtype]
    if bits > inf:
        return math.nan
    return float(torch.tensor([bits], dtype=signed).view(dtype)[0])


class StreamScan:
    """What a check needs, computed while a safetensors file's bytes stream past once: the whole
    file's sha256 (a registry blob's address) and, per tensor, its leaf (sha256 of its bytes) and
    max |w|, i.e. a format-2 `Scan`. The whole-file hash and the tensor pass each run on their own
    thread (hashlib and numpy release the GIL), so both overlap the copy that feeds them.

        stream = StreamScan()
        for chunk in chunks:
            stream.update(chunk)                # then write the chunk
        digest = stream.digest()                # "sha256:..." of every byte
        scan = stream.scan(manifest)            # None when the bytes were no format-2 patch
    """

    def __init__(self) -> None:
        self._whole = hashlib.sha256()
        self._pos = 0
        self._head = bytearray()
        self._spans: list[tuple[int, int, str]] | None = None  # (start, end, name) in the file, by start
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._leaves: dict[str, object] = {}
        self._peaks: dict[str, int] = {}
        self._carry: dict[str, bytes] = {}
        self._bad = False
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix="expertlib-stream") for _ in range(2)]
        self._pending: list = []
        self._done = False

    def update(self, chunk) -> None:
        """Take the next bytes of the file (a bytes-like object the caller no longer changes)."""
        offset, self._pos = self._pos, self._pos + len(chunk)
        self._pending.append(self._pools[0].submit(self._whole.update, chunk))
        self._pending.append(self._pools[1].submit(self._tensors, chunk, offset))
        while len(self._pending) > 2 * _AHEAD:
            self._pending.pop(0).result()

    def _finish(self) -> None:
        if not self._done:
            for f in self._pending:
                f.result()
            for p in self._pools:
                p.shutdown()
            self._pending, self._done = [], True

    @property
    def size(self) -> int:
        return self._pos

    def digest(self) -> str:
        self._finish()
        return "sha256:" + self._whole.hexdigest()

    def scan(self, manifest: ExpertSetManifest) -> Scan | None:
        """The format-2 scan of the bytes seen, or None (another format, or bytes that are no
        well-formed safetensors file: then the file must be checked the ordinary way)."""
        self._finish()
        if self._bad or self._spans is None or manifest.format_version < TREE_FORMAT:
            return None
        if self._spans and self._pos < self._spans[-1][1]:
            return None
        leaves = {n: h.hexdigest() for n, h in self._leaves.items()}
        absmax = {
            n: _bits_value(self._peaks[n], dtype) if dtype in _BITS else 0.0
            for n, (dtype, _) in self._meta.items()
        }
        return tree_scan(leaves, self._meta, absmax, manifest)

    # --- on the tensor thread ---

    def _tensors(self, chunk, offset: int) -> None:
        if self._bad:
            return
        try:
            if self._spans is None:
                self._head += chunk
                if not self._parse_header():
                    return
                chunk, offset = bytes(self._head), 0  # every byte so far, the header included
                self._head = bytearray()
            view = memoryview(chunk)
            end = offset + len(chunk)
            for a, b, name in self._spans:
                if b <= offset:
                    continue
                if a >= end:
                    break
                piece = view[max(a, offset) - offset : min(b, end) - offset]
                self._leaves[name].update(piece)
                dtype = self._meta[name][0]
                if dtype in _BITS and len(piece):
                    self._peak(name, piece, dtype)
        except Exception:  # malformed bytes: the caller checks the file the ordinary way
            self._bad = True

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

    def _parse_header(self) -> bool:
        """Once the header has arrived: the tensors' byte spans. False while it is still incomplete."""
        if len(self._head) < 8:
            return False
        n = struct.unpack("<Q", bytes(self._head[:8]))[0]
        if n > _MAX_HEADER:
            raise ValueError("header too large")
        if len(self._head) < 8 + n:
            return False
        from expertlib import jsonsafe

        header = jsonsafe.loads(bytes(self._head[8 : 8 + n]))
        if not isinstance(header, dict):
            raise ValueError("no header")
        header.pop("__metadata__", None)
        spans = []
        for name, info in header.items():
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
            if not 0 <= a <= b or b - a != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"bad offsets for {name}")
            spans.append((8 + n + a, 8 + n + b, name))
            self._meta[name] = (dtype, shape)
            self._leaves[name] = hashlib.sha256()
            self._peaks[name] = 0
        spans.sort()
        if any(p[1] > q[0] for p, q in itertools.pairwise(spans)):
            raise ValueError("overlapping tensors")
        self._spans = spans
        return True


#: the largest safetensors header a stream accepts (the format's own limit)
_MAX_HEADER = 100_000_000
