"""The Hugging Face Hub as a remote: one expert set per model repo.

A pushed repo holds
    expert_set.safetensors   the patch, byte for byte as stored in the registry
    expertlib.json           HubManifest: registry name, version, digest, size, tags, base, manifest
    README.md                a model card with the Hub's metadata (base_model, library_name, tags,
                             model-index of the recorded evaluation results, the experts replaced)
and each push is one commit (the revision history mirrors the versions pushed). Pulling
downloads `expertlib.json` and the patch at a revision, and checks the patch's address (its blake3
tree, or sha256 for older sets: `expertlib.verify.blob_digest`) against the announced digest before
the set enters the registry.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, StrictInt, field_validator

from expertlib import jsonsafe
from expertlib.errors import DigestMismatchError, InvalidNameError, NotFoundError, RemoteError
from expertlib.identity import BaseIdentity
from expertlib.patch import ExpertSetManifest
from expertlib.registry.blobs import BlobStore, file_digest
from expertlib.registry.evals import RETENTION_TASK, EvalRecord
from expertlib.registry.names import MAX_VERSION, RefSpec, validate_version
from expertlib.registry.protocol import WIRE_VERSION, BlobDigest, Entry, SetName, Tags, check_wire_version

PATCH_FILE = "expert_set.safetensors"
MANIFEST_FILE = "expertlib.json"
CARD_FILE = "README.md"
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class HubManifest(BaseModel):
    """`expertlib.json` in a Hub repo."""

    wire_version: StrictInt = WIRE_VERSION
    name: SetName
    version: int = Field(ge=1, le=MAX_VERSION)
    digest: BlobDigest = Field(description="address of expert_set.safetensors (expertlib.verify.blob_digest)")
    size: int = Field(ge=0)
    tags: Tags = Field(default_factory=list)
    base: BaseIdentity
    manifest: ExpertSetManifest
    evals: list[EvalRecord] = Field(
        default_factory=list, max_length=10_000, description="evaluation results (pull keeps them)"
    )

    @field_validator("wire_version")
    @classmethod
    def _wire(cls, v: int) -> int:
        return check_wire_version(v)


def parse_hub_url(url: str) -> tuple[str, str | None]:
    """`hf://owner/repo[@revision]` -> (repo id, revision)."""
    rest = url.removeprefix("hf://")
    repo, _, revision = rest.partition("@")
    if not _REPO_RE.match(repo) or ".." in repo:
        raise InvalidNameError(
            f"{url!r} is not hf://owner/repo[@revision]", hint="e.g. hf://me/tiny-math-esft@main"
        )
    return repo, revision or None


class HubRemote:
    """A Hub model repo (`hf://owner/repo[@revision]`) as a source or destination."""

    def __init__(self, repo_id: str, revision: str | None = None, *, token: str | None = None):
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.url = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
        self.options: dict[str, Any] = {}
        self.last_url: str | None = None

    @classmethod
    def from_url(cls, url: str, *, token: str | None = None) -> HubRemote:
        return cls(*parse_hub_url(url), token=token)

    # --- pull -----------------------------------------------------------------------------------

    def _download(self, filename: str) -> Path:
        import huggingface_hub as hfh
        from huggingface_hub import errors as hf_errors

        try:
            return Path(hfh.hf_hub_download(self.repo_id, filename, revision=self.revision, token=self.token))
        except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError) as exc:
            raise NotFoundError(
                f"{self.url} has no {filename}",
                hint="that repo was not pushed by expertlib (no expertlib.json)",
            ) from exc
        except hf_errors.RepositoryNotFoundError as exc:
            raise NotFoundError(
                f"no Hub repo {self.repo_id}", hint="check the repo id and your token"
            ) from exc
        except (
            hf_errors.RevisionNotFoundError,
            hf_errors.HfHubHTTPError,
            hf_errors.LocalEntryNotFoundError,
            hf_errors.OfflineModeIsEnabled,
            hf_errors.HFValidationError,
            OSError,
        ) as exc:
            raise RemoteError(
                f"cannot download {filename} from {self.url}: {exc}", hint="check network and token"
            ) from exc

    def manifest(self) -> HubManifest:
        path = self._download(MANIFEST_FILE)
        try:
            return HubManifest.model_validate(jsonsafe.loads(path.read_bytes()))
        except ValueError as exc:
            raise RemoteError(
                f"{self.url}: invalid {MANIFEST_FILE}: {exc}", hint="re-push the expert set"
            ) from exc

    def entries(self, spec: RefSpec | None, base: str | None) -> list[Entry]:
        hm = self.manifest()
        entry = Entry(
            name=hm.name,
            version=hm.version,
            digest=hm.digest,
            base=hm.base,
            tags=hm.tags,
            size=hm.size,
            **Entry.manifest_fields(hm.manifest),
            published_at=hm.manifest.created_at,
            source=self.url,
            evals=hm.evals,
        )
        if spec is not None and spec.name != hm.name:
            raise NotFoundError(f"{self.url} holds {hm.name!r}, not {spec.name!r}")
        if (
            base is not None
            and not hm.base.config_digest.startswith(base)
            and base not in (hm.base.name, hm.base.model_type)
        ):
            raise NotFoundError(
                f"{self.url} holds a set for base {hm.base.name or hm.base.model_type}, not {base}"
            )
        return [entry]

    def fetch(self, entry: Entry, staging: BlobStore) -> tuple[Path, bool]:
        path = self._download(PATCH_FILE)
        got = file_digest(path)
        if got != entry.digest:
            raise DigestMismatchError(
                f"{PATCH_FILE} in {self.url} hashes to {got[:19]}..., its {MANIFEST_FILE} says {entry.digest[:19]}...",
                path=str(path),
                hint="the repo was edited by hand or the download is damaged; nothing was imported",
            )
        return path, False

    # --- push -----------------------------------------------------------------------------------

    def find(self, entry: Entry) -> Entry | None:
        return None  # a push always makes a commit (the Hub deduplicates identical files itself)

    def set_tags(self, entry: Entry, tags: list[str]) -> None:  # pragma: no cover - find() never matches
        pass

    def put(self, entry: Entry, path: Path, tags: list[str]) -> Entry:
        import huggingface_hub as hfh
        from huggingface_hub import errors as hf_errors

        manifest = _manifest_of(path)
        hm = HubManifest(
            name=entry.name,
            version=validate_version(entry.version),
            digest=entry.digest,
            size=entry.size,
            tags=tags,
            base=entry.base,
            manifest=manifest,
            evals=entry.evals,
        )
        api = hfh.HfApi(token=self.token)
        ops = [
            hfh.CommitOperationAdd(path_in_repo=PATCH_FILE, path_or_fileobj=str(path)),
            hfh.CommitOperationAdd(
                path_in_repo=MANIFEST_FILE, path_or_fileobj=hm.model_dump_json(indent=2).encode()
            ),
            hfh.CommitOperationAdd(
                path_in_repo=CARD_FILE,
                path_or_fileobj=model_card(hm, self.repo_id, hm.evals).encode(),
            ),
        ]
        try:
            api.create_repo(
                self.repo_id, repo_type="model", private=self.options.get("private"), exist_ok=True
            )
            info = api.create_commit(
                self.repo_id,
                operations=ops,
                commit_message=f"expertlib: {entry.name}@{entry.version} ({entry.digest[:19]}...)",
                revision=self.revision,
                repo_type="model",
            )
        except (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled, OSError) as exc:
            raise RemoteError(
                f"push to {self.url} failed: {exc}", hint="check your token (HF_TOKEN) and network"
            ) from exc
        self.last_url = getattr(info, "commit_url", None) or str(info)
        return entry.model_copy(update={"source": self.url})


def _manifest_of(path: Path) -> ExpertSetManifest:
    from expertlib.patch import read_header

    return read_header(path)[0]


def model_card(hm: HubManifest, repo_id: str, evals: Sequence[EvalRecord] = ()) -> str:
    """README.md of a pushed expert set: the Hub's metadata (`huggingface_hub.ModelCardData`: base_model,
    library_name, tags, evaluation results as model-index) plus an `expertlib` block (the experts
    replaced, training data digest, digests), then what the set is and how to use it."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    m = hm.manifest
    base_name = hm.base.name or hm.base.model_type
    scores = [r for r in evals if r.task != RETENTION_TASK]
    data = ModelCardData(
        library_name="expertlib",
        tags=["expertlib", "esft", "mixture-of-experts", "expert-set", hm.base.model_type],
        base_model=hm.base.name if _hub_id(hm.base.name) else None,
        model_name=f"{hm.name}@{hm.version}",
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type=r.task,
                dataset_name=r.task,
                metric_type=r.metric,
                metric_value=r.value,
            )
            for r in scores
        ]
        or None,
        expertlib={
            "name": hm.name,
            "version": hm.version,
            "task": m.task,
            "digest": hm.digest,
            "content_digest": m.content_digest,
            "base": hm.base.model_dump(mode="json"),
            "experts_replaced": {int(layer): list(ids) for layer, ids in sorted(m.experts.items())},
            "num_experts": m.num_experts,
            "method": m.provenance.method,
            "training_data_digest": m.provenance.data_digest,
            "evaluations": [r.model_dump(mode="json", exclude_none=True) for r in evals],
        },
    )
    layers = "\n".join(
        f"| {layer} | {', '.join(map(str, ids))} |" for layer, ids in sorted(m.experts.items())
    )
    results = "\n".join(
        f"| {r.task} | {r.metric} | {r.value:.4g} | `{r.data_digest or '-'}` | {r.recorded_at:%Y-%m-%d} |"
        for r in evals
    )
    training = json.dumps(m.provenance.model_dump(exclude_defaults=True), indent=2, default=str)
    body = "\n".join(
        [
            f"# {hm.name}@{hm.version}: ESFT expert set for {base_name}",
            "",
            m.description
            or f"Experts of `{base_name}` retrained for the task `{m.task}` with expert-specialized "
            "fine-tuning (ESFT): only the routed experts listed below differ from the base model.",
            "",
            "| field | value |",
            "|---|---|",
            f"| task | `{m.task}` |",
            f"| base model | `{base_name}` ({hm.base.model_type}) |",
            f"| base config digest | `{hm.base.config_digest}` |",
            f"| experts replaced | {m.num_experts} in {len(m.experts)} layers |",
            f"| training data digest | `{m.provenance.data_digest or '-'}` |",
            f"| dtype | {m.dtype} |",
            f"| method | {m.provenance.method} |",
            f"| file | `{PATCH_FILE}`, {hm.size} bytes |",
            f"| digest | `{hm.digest}` |",
            "",
            "## Use",
            "",
            "```bash",
            f"expertlib pull hf://{repo_id}   # checks the digest above before importing",
            f"expertlib show {hm.name}",
            "```",
            "",
            "## Evaluation results",
            "",
            "| task | metric | value | data | date |\n|---|---|---|---|---|\n" + results
            if evals
            else "None recorded (`expertlib eval ... --record`).",
            "",
            "## Experts per layer",
            "",
            "| layer | experts |",
            "|---|---|",
            layers,
            "",
            "## Provenance",
            "",
            "```json",
            training,
            "```",
            "",
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _hub_id(name: str | None) -> bool:
    """Whether a base's name is a Hub repo id (owner/name) rather than a local folder."""
    return bool(name and re.match(r"^[\w.-]+/[\w.-]+$", name) and not Path(name).exists())
