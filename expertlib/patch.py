"""The expert-set patch: one task's retrained experts in one safetensors file.

A patch holds only the replaced experts' canonical tensors (`layers.{l}.experts.{e}.{part}`)
and, for the paper's ablations, extra full parameters (`params.{name}`). Its manifest (pydantic)
lives in the safetensors metadata, so listing and validating a patch never loads tensors.

    es = ExpertSet.open("math.safetensors")      # header + manifest only, validated
    es.manifest.experts                           # {layer: [expert ids]}
    es.verify()                                   # recompute digests, refuse NaN/inf (once per file)
    es.expert(3, 17)                              # ExpertWeights, loaded lazily

Files are never unpickled: anything that is not a safetensors file is refused up front.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from safetensors import safe_open
from safetensors.torch import save_file

from expertlib import jsonsafe
from expertlib.constants import (
    EXPERT_KEY,
    EXTRA_PARAM_PREFIX,
    MANIFEST_METADATA_KEY,
    PATCH_FORMAT_VERSION,
    UNVERSIONED_FORMAT,
)
from expertlib.errors import (
    PatchCorruptError,
    PatchFormatError,
    PatchShapeError,
    PatchVersionError,
)
from expertlib.fsutil import atomic_path
from expertlib.identity import BaseIdentity
from expertlib.moe import BIAS_PARTS, EXPERT_PARTS, ExpertWeights
from expertlib.profile import RoutingProfile
from expertlib.verify import (
    FileKey,
    Scan,
    VerifiedRecord,
    check_scan,
    digests_of,
    map_tensors,
    read_scanned,
    read_tensors,
    recall,
    remember,
    scan_file,
    scan_tensors,
)

ExpertMap = dict[int, list[int]]


class Provenance(BaseModel):
    """How an expert set was made. Training fills what it knows; everything is optional."""

    method: str = Field(
        default="manual", description="esft-token, esft-gate, esft-reference, extracted, manual, ..."
    )
    score_function: Literal["token", "gate"] | None = Field(
        default=None, description="ESFT relevance score used"
    )
    top_p: float | None = Field(
        default=None, description="cumulative score threshold p of the selection rule"
    )
    max_experts_per_layer: int | None = None
    token_budget: int | None = Field(default=None, description="token budget of the scoring sample")
    tokens_scored: int | None = None
    count_prompt_tokens: bool | None = Field(
        default=None, description="whether prompt tokens counted in scoring"
    )
    data_digest: str | None = Field(default=None, description="sha256 of the training data file")
    train_shared_experts: bool = False
    train_non_expert_modules: bool = False
    training: dict[str, Any] = Field(
        default_factory=dict, description="training settings (lr, steps, batch, ...)"
    )
    selection: dict[str, Any] = Field(
        default_factory=dict, description="the selection settings (SelectionConfig) the set was trained with"
    )
    data: dict[str, Any] = Field(
        default_factory=dict, description="the data settings (DataConfig: max length, packing, holdout, ...)"
    )
    steps: int | None = None
    final_train_loss: float | None = None
    final_eval_loss: float | None = None
    wall_time_s: float | None = None
    trainable_params: int | None = None
    routing_profile: RoutingProfile | None = Field(
        default=None, description="the task's prompt routing under the base, for model=auto"
    )
    base_anchors: dict[str, RoutingProfile] = Field(
        default_factory=dict,
        description="routing profiles of what the base already does (name -> profile): model=auto "
        "serves the base when a prompt is nearest one of them (expertlib.profile)",
    )
    extra: dict[str, Any] = Field(default_factory=dict)


class ExpertSetManifest(BaseModel):
    """Everything about an expert set except its tensors; stored in the safetensors metadata."""

    model_config = ConfigDict(extra="forbid")

    format_version: StrictInt = Field(
        default=UNVERSIONED_FORMAT, ge=1, description="patch format version (an integer, never a string)"
    )
    task: str = Field(description="task name the experts were trained for")
    description: str = ""
    base: BaseIdentity
    experts: ExpertMap = Field(description="MoE layer -> sorted routed expert ids this set replaces")
    dtype: str = Field(description="torch dtype of the stored tensors, e.g. float32")
    expert_shapes: dict[str, list[int]] = Field(description="canonical part -> shape, same for every expert")
    extra_params: dict[str, list[int]] = Field(
        default_factory=dict, description="full parameters carried besides routed experts: name -> shape"
    )
    expert_digests: dict[str, str] = Field(description="'l.e' -> digest of this set's expert (dedup, diff)")
    base_expert_digests: dict[str, str] = Field(description="'l.e' -> digest of the base expert it replaces")
    base_param_digests: dict[str, str] = Field(
        default_factory=dict, description="name -> digest of replaced params"
    )
    content_digest: str = Field(
        description="digest over every tensor's name, dtype, shape and bytes (blake3 from format 4, sha256 before)"
    )
    provenance: Provenance = Field(default_factory=Provenance)
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("experts")
    @classmethod
    def _sorted_unique(cls, v: ExpertMap) -> ExpertMap:
        out = {}
        for layer, ids in sorted(v.items()):
            if len(set(ids)) != len(ids):
                raise ValueError(f"layer {layer}: duplicate expert ids {ids}")
            if any(i < 0 for i in ids) or layer < 0:
                raise ValueError(f"layer {layer}: negative ids {ids}")
            out[int(layer)] = sorted(int(i) for i in ids)
        return out

    @property
    def num_experts(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer, ids in sorted(self.experts.items()) for e in ids]


def expert_key(layer: int, expert: int, part: str) -> str:
    return EXPERT_KEY.format(layer=layer, expert=expert, part=part)


def pair_key(layer: int, expert: int) -> str:
    return f"{layer}.{expert}"


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content digest of patch format 1: sha256 over (name, dtype, shape, raw bytes) in sorted name
    order. Format 2 digests are trees of per-tensor leaves (`expertlib.verify`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    return "sha256:" + h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class ExpertSet:
    """An expert set: manifest plus tensors, held in memory or opened lazily from a file."""

    def __init__(
        self, manifest: ExpertSetManifest, tensors: dict[str, torch.Tensor] | None = None, path=None
    ):
        self.manifest = manifest
        self._tensors = tensors
        self.path = Path(path) if path is not None else None
        self._verified: dict[str, str] | None = None  # per-expert digests recomputed by verify()
        self.scan: Scan | None = None  # what verify() found (digests, per-tensor max |w|)
        self.checked: VerifiedRecord | None = None  # the file's state when verify() last read it in full
        self._trusted: VerifiedRecord | None = None  # a record handed in by a store that checked the file

    def __repr__(self) -> str:
        m = self.manifest
        return f"ExpertSet(task={m.task!r}, base={m.base.name!r}, experts={m.num_experts}, layers={len(m.experts)})"

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        task: str,
        base: BaseIdentity,
        experts: Mapping[tuple[int, int], ExpertWeights],
        base_digests: Mapping[tuple[int, int], str],
        extra_params: Mapping[str, torch.Tensor] | None = None,
        base_param_digests: Mapping[str, str] | None = None,
        provenance: Provenance | None = None,
        description: str = "",
        dtype: torch.dtype | None = None,
    ) -> ExpertSet:
        """Assemble an in-memory expert set from canonical expert weights (see `expertlib.moe`)."""
        if not experts and not extra_params:
            raise PatchShapeError(
                "an expert set needs at least one expert", hint="check the expert selection"
            )
        missing = [k for k in experts if k not in base_digests]
        if missing:
            raise PatchShapeError(
                f"no base digest for experts {missing}", hint="pass the base expert digests"
            )
        first = next(iter(experts.values())) if experts else None
        dtype = dtype or (first.gate.dtype if first is not None else next(iter(extra_params.values())).dtype)
        tensors: dict[str, torch.Tensor] = {}
        expert_map: dict[int, list[int]] = {}
        shapes: dict[str, list[int]] = {}
        # the digests must be those of the stored tensors: cast first (e.g. fp32 master weights -> bf16)
        experts = {k: w.map(lambda t: t.detach().to("cpu", dtype).contiguous()) for k, w in experts.items()}
        for (layer, e), w in sorted(experts.items()):
            expert_map.setdefault(layer, []).append(e)
            for part, t in w.items():
                shape = list(t.shape)
                if shapes.setdefault(part, shape) != shape:
                    raise PatchShapeError(
                        f"layer {layer} expert {e} {part}: shape {shape} differs from {shapes[part]}"
                    )
                tensors[expert_key(layer, e, part)] = t
        for name, t in (extra_params or {}).items():
            tensors[EXTRA_PARAM_PREFIX + name] = t.detach().to("cpu", dtype).contiguous()
        digests = digests_of(tensors, expert_map, PATCH_FORMAT_VERSION)
        manifest = ExpertSetManifest(
            format_version=PATCH_FORMAT_VERSION,
            task=task,
            description=description,
            base=base,
            experts=expert_map,
            dtype=_dtype_name(dtype),
            expert_shapes=shapes,
            extra_params={n: list(t.shape) for n, t in (extra_params or {}).items()},
            expert_digests=digests.expert_digests,
            base_expert_digests={pair_key(*k): base_digests[k] for k in experts},
            base_param_digests=dict(base_param_digests or {}),
            content_digest=digests.content_digest,
            provenance=provenance or Provenance(),
        )
        return cls(manifest, tensors)

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temporary file in the same folder, fsync, rename."""
        path = Path(path)
        with atomic_path(path, fsync=True) as tmp:
            save_file(
                self.tensors, str(tmp), metadata={MANIFEST_METADATA_KEY: self.manifest.model_dump_json()}
            )
        self.path = path
        return path

    @classmethod
    def open(cls, path: str | Path) -> ExpertSet:
        """Open lazily: read and validate the header and manifest, load no tensor data."""
        path = Path(path)
        manifest, header = read_header(path)
        _validate_header(manifest, header, str(path))
        return cls(manifest, None, path)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._read_tensors()
        return self._tensors

    def _read_tensors(self) -> dict[str, torch.Tensor]:
        assert self.path is not None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise PatchCorruptError(
                f"cannot read tensors: {exc}", path=str(self.path), hint=_REPUBLISH
            ) from exc

    def verify(self, *, always: bool = False) -> dict[str, str]:
        """Check the tensors against the manifest; return the per-expert digests recomputed from them.

        Recomputes the content digest (any changed byte), every expert's digest (a manifest that
        claims another set's digests), and refuses NaN or infinite values (one such expert blanks
        every answer of a batch it shares), in one threaded pass (`expertlib.verify`). Raises
        DigestMismatchError or NonFiniteWeightsError. Slot sharing trusts only these recomputed digests.

        A file is read in full once: while it stays unchanged (device, inode, size, mtime, ctime),
        a check this process made, or a record handed in with `trust` (the registry's, made at
        ingest), stands. `always=True` reads and hashes the file again regardless."""
        if self._verified is not None and not always:
            return self._verified
        m = self.manifest
        where = str(self.path) if self.path else None
        if self._tensors is not None:
            scan = scan_tensors(self._tensors, m)
            check_scan(scan, m, where)
        else:
            assert self.path is not None
            standing = None if always else self._standing_record()
            if standing is not None:
                scan, self.checked = standing.scan, standing
            else:
                scan, key = scan_file(self.path, m, self._expected())
                check_scan(scan, m, where)
                if key is not None:
                    self._checked_now(key, scan)
        self.scan = scan
        self._verified = dict(scan.expert_digests)
        return self._verified

    def verify_streamed(self, scan: Scan | None, key: FileKey | None) -> dict[str, str]:
        """`verify`, from a scan of this file's bytes made while they were written (a copy into the
        registry: `expertlib.verify.StreamScan`) instead of a second read. `key`: the file's state
        right after that write; the check is remembered only while the file is still in it. Without
        a usable scan (format 1, other tensors than the manifest's) the file is read and checked."""
        m = self.manifest
        expected = self._expected()
        if scan is None or self.path is None or set(scan.absmax) != set(expected):
            return self.verify(always=True)
        check_scan(scan, m, str(self.path))
        if key is not None and key == FileKey.of(self.path):
            self._checked_now(key, scan)
        self.scan, self._verified = scan, dict(scan.expert_digests)
        return self._verified

    def trust(self, record: VerifiedRecord) -> ExpertSet:
        """Accept `record` (a full check of this file made elsewhere) while the file still matches it."""
        self._trusted = record
        return self

    def read_verified(self, *, always: bool = False, scratch=None) -> ExpertSet:
        """Read a lazily opened set's file into host memory, each byte once, and check those very
        bytes, unless a check of the unchanged file stands (as in `verify`); the tensors are then
        views on that one buffer (`scratch(size)` may hand one in to reuse; None: a fresh one). What
        the engine's workers copy into slots."""
        if self._tensors is not None or self.path is None:
            self.verify(always=always)
            return self
        m = self.manifest
        before = FileKey.of(self.path)
        standing = None if always else self._standing_record()
        if standing is not None:  # read only; the check stands if the file stayed as it was
            tensors = read_tensors(self.path, self._expected(), scratch)
            same = before is not None and before == FileKey.of(self.path)
            scan = standing.scan if same else scan_tensors(tensors, m)
        else:  # read and hash overlapped
            tensors, scan = read_scanned(self.path, m, self._expected(), scratch)
            same = before is not None and before == FileKey.of(self.path)
        if same and standing is not None:
            self.checked = standing
        else:
            check_scan(scan, m, str(self.path))
            if same:
                self._checked_now(before, scan)
        self._tensors, self.scan, self._verified = tensors, scan, dict(scan.expert_digests)
        return self

    def map_verified(self) -> FileKey:
        """Check the set (a standing check, else one hashing pass over a memory map of the file) and
        take its tensors as views on a private memory map: no host buffer of the set's size, for a
        reader in the background of sets of many GiB. The map shows later writes to the file, so what
        is derived from these tensors stands only while the file keeps the returned state
        (`still_as_mapped` before using it); raises PatchCorruptError when the file changed during
        the check."""
        assert self.path is not None
        before = FileKey.of(self.path)
        self.verify()
        tensors = map_tensors(self.path, self._expected())
        if before is None or FileKey.of(self.path) != before:
            raise PatchCorruptError(
                "the file changed while it was checked", path=str(self.path), hint=_REPUBLISH
            )
        self._tensors = tensors
        return before

    def still_as_mapped(self, state: FileKey, doing: str) -> None:
        """Raise PatchCorruptError unless the file is still in `state` (what `map_verified` returned):
        what was made from the map while `doing` is then what was checked."""
        if FileKey.of(self.path) != state:
            raise PatchCorruptError(
                f"the set file changed while it was {doing}", path=str(self.path), hint=_REPUBLISH
            )

    def _standing_record(self) -> VerifiedRecord | None:
        """A full check of this file in its present state: handed in with `trust`, or made here."""
        m = self.manifest
        if self._trusted is not None and self._trusted.matches(self.path, m.content_digest):
            return self._trusted
        key = FileKey.of(self.path)
        scan = recall(self.path, m.content_digest)
        if scan is None or key is None:
            return None
        return VerifiedRecord(path=str(self.path.resolve()), key=list(key), scan=scan)

    def _checked_now(self, key: FileKey, scan: Scan) -> None:
        remember(self.path, key, scan)
        self.checked = VerifiedRecord(path=str(self.path.resolve()), key=list(key), scan=scan)

    def _expected(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        """Tensor name -> (dtype, shape), as the manifest promises them."""
        m = self.manifest
        dtype = getattr(torch, m.dtype)
        out = {}
        for layer, e in m.pairs():
            for part, shape in m.expert_shapes.items():
                out[expert_key(layer, e, part)] = (dtype, shape)
        for name, shape in m.extra_params.items():
            out[EXTRA_PARAM_PREFIX + name] = (dtype, shape)
        return out

    # --- access --------------------------------------------------------------------------------

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        try:
            return _expert_of(self.tensors, layer, expert)
        except KeyError:
            raise KeyError(
                f"expert set {self.manifest.task!r} has no expert {expert} in layer {layer}"
            ) from None

    def experts(self) -> Iterable[tuple[tuple[int, int], ExpertWeights]]:
        for layer, e in self.manifest.pairs():
            yield (layer, e), self.expert(layer, e)

    def extra_params(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[EXTRA_PARAM_PREFIX + n] for n in self.manifest.extra_params}

    @property
    def nbytes(self) -> int:
        if self._tensors is None and self.path is not None:
            return self.path.stat().st_size
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_REPUBLISH = "the file is damaged: re-export or pull the expert set again"


def _expert_of(tensors: Mapping[str, torch.Tensor], layer: int, expert: int) -> ExpertWeights:
    parts = {}
    for part in (*EXPERT_PARTS, *BIAS_PARTS):
        key = expert_key(layer, expert, part)
        if key in tensors:
            parts[part] = tensors[key]
    if not parts:
        raise KeyError((layer, expert))
    return ExpertWeights(**parts)


def read_header(path: str | Path) -> tuple[ExpertSetManifest, dict[str, Any]]:
    """Read a patch's manifest and tensor index without loading tensor data or unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise PatchFormatError("no such file", path=str(path), hint="check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    if not raw.lstrip().startswith(b"{"):
        # Not a readable safetensors header: say what it is, without ever unpickling it.
        if head[:2] == b"PK" or (_looks_like_pickle(head) and not 0 < n <= size - 8):
            raise PatchFormatError(
                "this is a pickle or PyTorch zip checkpoint; expertlib never unpickles files",
                path=str(path),
                hint="convert the weights to an expert set with `expertlib import-esft` or ExpertSet.build",
            )
        if len(head) < 8:
            raise PatchCorruptError(
                "file is too short to be a safetensors file", path=str(path), hint=_REPUBLISH
            )
        if n > size - 8 and n < 100_000_000:
            raise PatchCorruptError(
                f"header claims {n} bytes but the file has {size - 8} (truncated?)",
                path=str(path),
                hint=_REPUBLISH,
            )
        raise PatchFormatError(
            "not a safetensors file", path=str(path), hint="pass an expert-set .safetensors file"
        )
    try:
        header = jsonsafe.loads(raw)
    except ValueError as exc:  # invalid JSON, bad UTF-8, or nested too deeply
        raise PatchCorruptError(
            f"unreadable safetensors header: {exc}", path=str(path), hint=_REPUBLISH
        ) from None
    if not isinstance(header, dict):
        raise PatchCorruptError(
            "the safetensors header is not a JSON object", path=str(path), hint=_REPUBLISH
        )
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PatchCorruptError(
            "the safetensors metadata is not a string map", path=str(path), hint=_REPUBLISH
        )
    for name, info in header.items():
        _check_entry(name, info, str(path))
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise PatchCorruptError(
            f"file has {size} bytes, its header describes {8 + n + end} (truncated or padded)",
            path=str(path),
            hint=_REPUBLISH,
        )
    if MANIFEST_METADATA_KEY not in meta:
        raise PatchFormatError(
            "safetensors file without an expertlib manifest",
            path=str(path),
            hint="a reference ESFT adapter folder enters with `expertlib import-esft DIR --base BASE`",
        )
    try:
        raw_manifest = jsonsafe.loads(meta[MANIFEST_METADATA_KEY], max_depth=jsonsafe.MAX_MANIFEST_DEPTH)
    except ValueError as exc:
        raise PatchCorruptError(f"unreadable manifest: {exc}", path=str(path), hint=_REPUBLISH) from None
    version = raw_manifest.get("format_version") if isinstance(raw_manifest, dict) else None
    if isinstance(version, int) and version > PATCH_FORMAT_VERSION:
        raise PatchVersionError(
            f"patch format version {version} is newer than this expertlib understands ({PATCH_FORMAT_VERSION})",
            path=str(path),
            hint="upgrade expertlib: pip install -U expertlib",
        )
    try:
        manifest = ExpertSetManifest.model_validate(raw_manifest)
    except ValidationError as exc:
        raise PatchCorruptError(f"invalid manifest: {exc}", path=str(path), hint=_REPUBLISH) from exc
    return manifest, header


def _looks_like_pickle(head: bytes) -> bool:
    """A pickle (or torch.save) starts with PROTO (0x80) and a protocol number 2..5."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_entry(name: str, info: Any, where: str) -> None:
    """One tensor entry of a safetensors header: {"dtype": str, "shape": [int], "data_offsets": [a, b]}."""
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"])
        and info["data_offsets"][0] <= info["data_offsets"][1]
    )
    if not ok:
        raise PatchCorruptError(
            f"header entry {name[:80]!r} is not a tensor description (dtype, shape, data_offsets)",
            path=where,
            hint=_REPUBLISH,
        )


def _validate_header(m: ExpertSetManifest, header: dict[str, Any], where: str) -> None:
    """Names, shapes and dtypes in the file agree with the manifest, before any tensor is read."""
    expected: dict[str, list[int]] = {}
    for layer, e in m.pairs():
        for part, shape in m.expert_shapes.items():
            expected[expert_key(layer, e, part)] = shape
    for name, shape in m.extra_params.items():
        expected[EXTRA_PARAM_PREFIX + name] = shape
    missing = sorted(set(expected) - set(header))
    unknown = sorted(set(header) - set(expected))
    if missing or unknown:
        raise PatchShapeError(
            f"tensor names disagree with the manifest: missing {missing[:5]}, unknown {unknown[:5]}",
            path=where,
            hint="the file was not written by expertlib or was edited; re-export it",
        )
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"])
        if dtype != m.dtype:
            raise PatchShapeError(
                f"{name}: dtype {dtype}, manifest says {m.dtype}", path=where, hint=_REPUBLISH
            )
        if list(info["shape"]) != expected[name]:
            raise PatchShapeError(
                f"{name}: shape {info['shape']}, manifest says {expected[name]}", path=where, hint=_REPUBLISH
            )
    if set(m.expert_digests) != {pair_key(*p) for p in m.pairs()} or set(m.base_expert_digests) != set(
        m.expert_digests
    ):
        raise PatchShapeError("digest tables disagree with the expert map", path=where, hint=_REPUBLISH)
