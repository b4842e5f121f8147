"""A registry remote on object storage, through fsspec: `s3://bucket/prefix`, `gs://...`, `az://...`,
`memory://...`, `file://...` or any other fsspec URL (its filesystem package installed: s3fs, gcsfs,
adlfs). Push and pull work as with a folder; credentials come from fsspec's usual sources (the
environment, config files) and options through `storage_options`.

Layout under the URL (plain objects, no database; readable with any client):

    blobs/<hex>, blobs/blake3/<hex>             the patch file, addressed by its sha256 or blake3 digest
    entries/<base key>/<name>/<version>.json    one Entry (name, version, tags, base, digest, evals, ...)

A blob is written under a temporary key and moved into place before its entry is written, so a
reader never sees an entry without its bytes. Every transfer checks digests both ways: bytes read
are hashed and refused unless they match the entry, and a push hashes the file it uploads.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from expertlib.errors import AlreadyExistsError, NotFoundError, RemoteError
from expertlib.registry.blobs import BlobStore
from expertlib.registry.client import at_most
from expertlib.registry.names import LATEST, RefSpec, digest_path, validate_digest, validate_name
from expertlib.registry.protocol import Entry
from expertlib.verify import StreamScan

CHUNK = 1 << 20


class ObjectStoreRemote:
    """A registry on object storage, as a source and as a destination."""

    def __init__(self, url: str, *, storage_options: dict[str, Any] | None = None):
        import fsspec

        self.url = url.rstrip("/")
        target = url.removeprefix("fsspec::")
        options = dict(storage_options or {})
        if target.startswith("file://"):
            options.setdefault("auto_mkdir", True)  # a folder has directories; a bucket does not
        try:
            self.fs, self.root = fsspec.core.url_to_fs(target, **options)
        except (ImportError, ValueError) as exc:
            raise RemoteError(
                f"cannot open {url}: {exc}",
                hint="install the filesystem for its scheme (s3fs for s3://, gcsfs for gs://, adlfs for az://)",
            ) from None
        self.root = self.root.rstrip("/")

    # --- layout ----------------------------------------------------------------------------------

    def _blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest_path(digest)}"

    def _entry_key(self, e: Entry) -> str:
        return f"{self.root}/entries/{e.base_key}/{validate_name(e.name)}/{int(e.version)}.json"

    def _all(self) -> list[Entry]:
        try:
            keys = [k for k in self.fs.find(f"{self.root}/entries") if k.endswith(".json")]
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 - every backend has its own errors
            raise RemoteError(f"cannot list {self.url}: {exc}", hint="check the URL and credentials") from exc
        out = []
        for key in keys:
            try:
                out.append(Entry.model_validate_json(self.fs.cat_file(key)))
            except ValueError as exc:
                raise RemoteError(
                    f"{self.url}: {key} is not a registry entry: {exc}",
                    hint="the bucket holds something else under this prefix; use another prefix",
                ) from None
        return _with_latest(out)

    # --- source ----------------------------------------------------------------------------------

    def entries(self, spec: RefSpec | None, base: str | None) -> list[Entry]:
        found = [e for e in self._all() if base is None or base in (e.base.config_digest, e.base_key)]
        if spec is None:
            return found
        found = [e for e in found if e.name == spec.name]
        if spec.selector is None:
            if not found:
                raise NotFoundError(f"{self.url} holds no expert set named {spec.name!r}")
            return found
        picked = [e for e in found if _matches(e, spec)]
        if not picked:
            raise NotFoundError(f"{self.url} holds no {spec}", hint="list it with `expertlib pull --dry-run`")
        return picked[-1:]

    def fetch(self, entry: Entry, staging: BlobStore) -> tuple[Path, bool]:
        digest = validate_digest(entry.digest)
        try:
            with self.fs.open(self._blob(digest), "rb") as f:
                body = at_most(iter(lambda: f.read(CHUNK), b""), entry.size, f"{entry.ref} from {self.url}")
                tmp = staging.write_temp(body, expected_digest=digest)
        except FileNotFoundError:
            raise NotFoundError(
                f"{self.url} lists {entry.ref} but holds no blob {digest[:19]}...",
                hint="push the set there again",
            ) from None
        return tmp.path, True

    # --- sink ------------------------------------------------------------------------------------

    def find(self, entry: Entry) -> Entry | None:
        same = [e for e in self._all() if e.base_key == entry.base_key and e.name == entry.name]
        return next((e for e in same if e.digest == entry.digest), None)

    def put(self, entry: Entry, path: Path, tags: list[str]) -> Entry:
        digest = validate_digest(entry.digest)
        same = [e for e in self._all() if e.base_key == entry.base_key and e.name == entry.name]
        if any(e.version == entry.version for e in same):
            raise AlreadyExistsError(
                f"{self.url} already holds {entry.name}@{entry.version} with other bytes",
                hint="publish the set under a new version, or push to another prefix",
            )
        blob = self._blob(digest)
        if not self.fs.exists(blob):
            tmp = f"{self.root}/tmp/{uuid.uuid4().hex}"
            h = StreamScan()  # the bytes' registry address (expertlib.verify.blob_digest)
            with open(path, "rb") as src, self.fs.open(tmp, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.digest() != digest:
                self.fs.rm(tmp)
                raise RemoteError(f"{path} changed while it was pushed", hint="push it again")
            self.fs.mv(tmp, blob)
        new = entry.model_copy(update={"tags": [t for t in tags if t != LATEST], "manifest": None})
        self.fs.pipe_file(self._entry_key(new), new.model_dump_json().encode())
        self.set_tags(new, tags)
        return next(
            e
            for e in self._all()
            if e.base_key == new.base_key and e.name == new.name and e.version == new.version
        )

    def set_tags(self, entry: Entry, tags: list[str]) -> None:
        tags = [t for t in tags if t != LATEST]  # latest is the highest version, never stored
        if not tags:
            return
        for e in self._all():
            if e.base_key != entry.base_key or e.name != entry.name:
                continue
            stored = [t for t in e.tags if t != LATEST]
            want = (
                sorted(set(stored) | set(tags))
                if e.version == entry.version
                else [t for t in stored if t not in tags]
            )
            if want != sorted(stored):
                self.fs.pipe_file(
                    self._entry_key(e), e.model_copy(update={"tags": want}).model_dump_json().encode()
                )

    def record_evals(self, entry: Entry, records: list) -> None:
        """Keep evaluation results in the version's entry object (same task, metric and data: replaced)."""
        from expertlib.registry.evals import merge_evals

        for e in self._all():
            if e.base_key == entry.base_key and e.name == entry.name and e.version == entry.version:
                stored = e.model_copy(
                    update={
                        "evals": merge_evals(e.evals, records),
                        "tags": [t for t in e.tags if t != LATEST],
                    }
                )
                self.fs.pipe_file(self._entry_key(e), stored.model_dump_json().encode())


def _matches(e: Entry, spec: RefSpec) -> bool:
    if spec.version is not None:
        return e.version == spec.version
    if spec.digest is not None:
        return e.digest.startswith(spec.digest)
    return spec.tag in e.tags


def _with_latest(entries: list[Entry]) -> list[Entry]:
    """Entries in (base, name, version) order, the highest version of each name tagged `latest`."""
    entries.sort(key=lambda e: (e.base_key, e.name, e.version))
    top = {(e.base_key, e.name): e.version for e in entries}
    return [
        e.model_copy(update={"tags": [*(t for t in e.tags if t != LATEST), LATEST]})
        if top[(e.base_key, e.name)] == e.version
        else e
        for e in entries
    ]
