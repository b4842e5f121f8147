"""What the registry returns, and the JSON wire format between registries (HTTP, folder, Hub).

Every value here is a pydantic model, so the same objects are the library's return values,
the CLI's `--json` output and the HTTP bodies (`expertlib.server.registry_routes`).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, StrictInt, field_validator

from expertlib.identity import BaseIdentity
from expertlib.patch import ExpertSetManifest
from expertlib.registry.names import (
    LATEST,
    MAX_STORED_VERSION,
    MAX_VERSION,
    Ref,
    validate_digest,
    validate_name,
    validate_tag,
)


def _validate_tags(tags: list[str]) -> list[str]:
    return [t if t == LATEST else validate_tag(t) for t in tags]


# Field types for what arrives from remotes: names, digests and tags end up in paths and URLs.
SetName = Annotated[str, AfterValidator(validate_name)]
BlobDigest = Annotated[str, AfterValidator(validate_digest)]
Tags = Annotated[list[str], AfterValidator(_validate_tags)]

#: Version of the registry wire format (HTTP bodies, Hub manifest). Bumped on breaking changes.
WIRE_VERSION = 1


#: Most evaluation results one request records (a push sends more in several).
EVALS_PER_REQUEST = 100
#: Task and metric names of evaluation results: short printable labels (tables, the web view, Hub cards).
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/+()-]{0,99}$")
LABEL_HINT = "use letters, digits, spaces and . _ : / + ( ) - (at most 100 characters)"


class EvalRecord(BaseModel):
    """One measured score of one expert-set version (`expertlib.registry.evals`)."""

    task: str = Field(description="what was measured, e.g. the toy task `sum` or a data file's name")
    metric: str = Field(description="exact_match, contains, answer_loss, perplexity, ...")
    value: float = Field(description="the score (finite)")
    data_digest: str = Field(default="", description="sha256 of the evaluation data ('' when unknown)")
    n: int | None = Field(default=None, ge=0, description="samples evaluated")
    recorded_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    source: str | None = Field(default=None, description="what measured it (expertlib eval, demo, ...)")

    @field_validator("task", "metric")
    @classmethod
    def _label(cls, v: str) -> str:
        if not isinstance(v, str) or not _LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid label: {LABEL_HINT}")
        return v

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"score {v} is not finite")
        return v

    @field_validator("data_digest")
    @classmethod
    def _digest(cls, v: str) -> str:
        if v and not re.match(r"^sha256:[0-9a-f]{64}$", v):
            raise ValueError(f"data digest {v!r} is not sha256:<64 hex digits>")
        return v


def base_key(base: BaseIdentity) -> str:
    """The key a base model is stored under: model_type plus structural config digest."""
    return f"{base.model_type}/{base.config_digest}"


class Entry(BaseModel):
    """One published version of an expert set."""

    name: SetName = Field(description="registry name of the set (the task)")
    version: int = Field(
        ge=1, le=MAX_STORED_VERSION, description=f"version number, 1 to {MAX_VERSION} (never reused)"
    )
    digest: BlobDigest = Field(description="the patch file's address (blake3, older sets sha256); immutable")
    base: BaseIdentity = Field(description="base model the set belongs to")
    tags: Tags = Field(default_factory=list, description="tags pointing at this version (incl. latest)")
    size: int = Field(ge=0, description="patch file size in bytes")
    content_digest: str = Field(description="the manifest's digest over the tensors")
    task: str = Field(description="task name recorded in the patch manifest")
    description: str = ""
    num_experts: int = Field(description="routed experts replaced, all layers")
    experts: dict[int, list[int]] = Field(description="MoE layer -> expert ids")
    dtype: str
    method: str = Field(default="manual", description="provenance method (esft-token, extracted, ...)")
    published_at: datetime
    source: str | None = Field(default=None, description="where the set was pulled from, if pulled")
    manifest: ExpertSetManifest | None = Field(default=None, description="full manifest (show only)")
    evals: list[EvalRecord] = Field(
        default_factory=list,
        max_length=10_000,
        description="evaluation results kept with this version, as a remote lists them (push and pull "
        "carry them; a local listing leaves them to `Registry.evals`)",
    )

    @staticmethod
    def manifest_fields(m: ExpertSetManifest) -> dict[str, Any]:
        """The entry fields that are copied from a patch manifest."""
        return dict(
            content_digest=m.content_digest,
            task=m.task,
            description=m.description,
            num_experts=m.num_experts,
            experts=m.experts,
            dtype=m.dtype,
            method=m.provenance.method,
        )

    @property
    def ref(self) -> Ref:
        return Ref(self.name, self.version, self.digest)

    @property
    def base_key(self) -> str:
        return base_key(self.base)

    def summary(self) -> dict[str, Any]:
        """The fields a listing shows."""
        return {
            "name": self.name,
            "version": self.version,
            "tags": self.tags,
            "digest": self.digest,
            "base": self.base.name or self.base.model_type,
            "base_digest": self.base.config_digest,
            "experts": self.num_experts,
            "layers": len(self.experts),
            "size": self.size,
            "published_at": self.published_at.isoformat(timespec="seconds"),
        }


class EntryList(BaseModel):
    wire_version: StrictInt = WIRE_VERSION
    entries: list[Entry]

    @field_validator("wire_version")
    @classmethod
    def _wire(cls, v: int) -> int:
        return check_wire_version(v)


def check_wire_version(v: int) -> int:
    if v != WIRE_VERSION:
        raise ValueError(f"wire format version {v}; this expertlib speaks version {WIRE_VERSION}")
    return v


class VerifyProblem(BaseModel):
    digest: str
    refs: list[str] = Field(description="name@version entries that use the blob")
    problem: str


class VerifyReport(BaseModel):
    checked: int = Field(description="blobs whose digest was recomputed")
    problems: list[VerifyProblem] = Field(default_factory=list)
    unreferenced: int = Field(default=0, description="blobs no entry uses (removed by gc)")
    stale_temps: int = Field(default=0, description="leftover temp files (removed by gc)")

    @property
    def ok(self) -> bool:
        return not self.problems


class GcReport(BaseModel):
    removed_blobs: list[str] = Field(default_factory=list)
    removed_temps: list[str] = Field(default_factory=list)
    freed_bytes: int = 0
    dry_run: bool = False


class TransferReport(BaseModel):
    """What a push or pull did: entries copied, entries already present, tags set."""

    source: str
    dest: str
    copied: list[str] = Field(default_factory=list, description="name@version at the destination")
    present: list[str] = Field(default_factory=list, description="already there (same digest)")
    tags: list[str] = Field(default_factory=list, description="name@tag set at the destination")
    url: str | None = None


class PushRequestInfo(BaseModel):
    """Query parameters of an HTTP push (the body is the patch bytes)."""

    name: str
    digest: str = Field(description="the body's address (blob_digest); the server refuses other bytes")
    tags: list[str] = Field(default_factory=list)
    source: str | None = None


class TagRequest(BaseModel):
    ref: str = Field(description="reference to tag, e.g. math@3")
    tag: str
    base: str | None = Field(default=None, description="base filter when the name exists for several bases")


class EvalsRequest(BaseModel):
    """Evaluation results to keep with a version (a push carries its source's)."""

    ref: str = Field(description="the version they measure, e.g. math@3 or math@blake3:...")
    base: str | None = Field(default=None, description="base filter when the name exists for several bases")
    records: list[EvalRecord] = Field(max_length=EVALS_PER_REQUEST)
