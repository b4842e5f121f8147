"""Push and pull between registries: another registry folder, an HTTP registry, the Hugging Face Hub.

    SOURCE / DEST forms
      /path/to/registry           another registry folder (e.g. on a shared filesystem)
      http(s)://host/prefix       an expertlib server's registry routes (`expertlib.server.registry_routes`)
      hf://owner/repo[@revision]  a Hugging Face Hub model repo holding one expert set

Every transfer checks digests: bytes are hashed while they are received and refused unless
they match the digest the source announced, before anything enters the destination. The hashing
rides along with the copy (`BlobStore.write_temp`): a set crosses into a registry in one pass over
its bytes, and a download lands in the destination's tmp/ once and is published from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from expertlib.errors import InvalidNameError, NotFoundError, RemoteError
from expertlib.identity import BaseIdentity
from expertlib.registry.blobs import BlobStore, TempBlob
from expertlib.registry.local import BaseArg, RegistryStore
from expertlib.registry.names import LATEST, RefSpec, parse_ref
from expertlib.registry.protocol import Entry, TransferReport

HF_SCHEME = "hf://"
#: object storage through fsspec (`expertlib.registry.objectstore`); any other fsspec URL as `fsspec::URL`
OBJECT_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "memory://", "file://")


class Source(Protocol):
    url: str

    def entries(self, spec: RefSpec | None, base: str | None) -> list[Entry]: ...

    def fetch(self, entry: Entry, staging: BlobStore) -> tuple[Path | TempBlob, bool]:
        """A local file with the entry's bytes (digest checked), and whether it is a temp file to
        delete; a TempBlob when the bytes were written into `staging` (hashed on the way)."""
        ...


class Sink(Protocol):
    url: str

    def find(self, entry: Entry) -> Entry | None: ...

    def put(self, entry: Entry, path: Path, tags: list[str]) -> Entry: ...

    def set_tags(self, entry: Entry, tags: list[str]) -> None: ...

    # optional: `record_evals(entry, records)` keeps evaluation results with a version already there
    # (a sink without it keeps what `put` stores of `Entry.evals`: the Hub writes them into its card)


class FolderRemote:
    """Another registry folder, as a source and as a destination."""

    def __init__(self, registry: RegistryStore | str | Path, *, create: bool = True):
        self.registry = (
            registry if isinstance(registry, RegistryStore) else _open_folder(registry, create=create)
        )
        self.url = str(self.registry.root.resolve())

    def entries(self, spec: RefSpec | None, base: str | None) -> list[Entry]:
        """The entries `spec` names, each with its evaluation results (they travel with it)."""
        from expertlib.registry.evals import with_evals

        if spec is None:
            found = self.registry.list(base=base)
        elif spec.selector is None:
            found = self.registry.list(base=base, name=spec.name)
        else:
            found = [self.registry.resolve(spec, base=base)]
        return with_evals(self.registry, found)

    def fetch(self, entry: Entry, staging: BlobStore) -> tuple[Path, bool]:
        path = self.registry.blobs.path(entry.digest)
        # a blob unchanged since its last full check is not read twice: the copy hashes it anyway
        unchanged = self.registry.blobs.record(entry.digest, entry.content_digest) is not None
        problem = None if unchanged else self.registry.check_blob(entry.digest)
        if problem:
            from expertlib.errors import DigestMismatchError

            raise DigestMismatchError(
                f"{entry.ref} in {self.url}: {problem}",
                hint=f"run `expertlib verify --registry {self.url}` there and re-publish or re-pull it",
            )
        return path, False

    def find(self, entry: Entry) -> Entry | None:
        try:
            have = self.registry.list(base=entry.base, name=entry.name)
        except Exception:  # unknown base or name: not there
            return None
        return next((e for e in have if e.digest == entry.digest), None)

    def put(self, entry: Entry, path: Path, tags: list[str], staged: TempBlob | None = None) -> Entry:
        """Publish the entry's file here (`staged`: already written into this registry's tmp/)."""
        return self.registry.publish(
            path,
            staged=staged,
            task=entry.name,
            tags=tags,
            base=entry.base,
            expected_digest=entry.digest,
            source=entry.source,
            version=entry.version,
        )

    def set_tags(self, entry: Entry, tags: list[str]) -> None:
        for t in tags:
            self.registry.tag(entry.ref, t, base=entry.base)

    def record_evals(self, entry: Entry, records: list) -> None:
        from expertlib.registry.evals import record_evals

        record_evals(self.registry, entry.ref, records, base=entry.base)


def _open_folder(path: str | Path, *, create: bool = True) -> RegistryStore:
    """A registry folder; a source (`create=False`) must already be one and is never written."""
    p = Path(path).expanduser()
    if not (p / "index.db").is_file() and p.exists() and any(p.iterdir()):
        raise RemoteError(
            f"{p} is not an expertlib registry (no index.db)", hint="pass a registry root folder"
        )
    if not create and not (p / "index.db").is_file():
        raise NotFoundError(
            f"no expertlib registry at {p}" + ("" if p.exists() else " (no such folder)"),
            hint="check the path: pull reads an existing registry folder and never creates one",
        )
    return RegistryStore(p)


def open_remote(url: str, *, token: str | None = None, source: bool = False) -> Source | Sink:
    url = str(url)
    if url.startswith(HF_SCHEME):
        from expertlib.registry.hub import HubRemote

        return HubRemote.from_url(url, token=token)
    if url.startswith(("http://", "https://")):
        from expertlib.registry.client import HttpRemote

        return HttpRemote(url, token=token)
    if url.startswith(("fsspec::", *OBJECT_SCHEMES)):
        from expertlib.registry.objectstore import ObjectStoreRemote

        return ObjectStoreRemote(url)
    if "://" in url:
        raise InvalidNameError(
            f"unknown remote {url!r}",
            hint="use a folder, http(s)://host/prefix, hf://owner/repo, s3:// gs:// az:// or fsspec::URL",
        )
    return FolderRemote(url, create=not source)


def _wire_base(base: BaseArg) -> str | None:
    """A base filter every remote understands: the structural config digest."""
    if base is None:
        return None
    if isinstance(base, BaseIdentity):
        return base.config_digest
    if Path(str(base), "config.json").is_file():
        from expertlib.identity import folder_identity

        return folder_identity(base).config_digest
    return str(base)


def _collect(src: Source, refs: Sequence[str], base: BaseArg) -> list[Entry]:
    wb = _wire_base(base)
    specs = [parse_ref(r) for r in refs] or [None]
    found: dict[tuple[str, str, int], Entry] = {}
    for spec in specs:
        for e in src.entries(spec, wb):
            found[(e.base_key, e.name, e.version)] = e
    return [found[k] for k in sorted(found)]


def transfer(
    src: Source, sink: Sink, entries: list[Entry], staging: BlobStore, *, progress: bool = False
) -> TransferReport:
    """Copy `entries` (in order) from `src` to `sink`; digests checked on the way."""
    from tqdm import tqdm

    report = TransferReport(source=src.url, dest=sink.url)
    bar = tqdm(
        total=sum(e.size for e in entries), unit="B", unit_scale=True, disable=not progress, leave=False
    )
    streamed = hasattr(src, "on_bytes")  # a download reports its bytes as they arrive
    if streamed:
        src.on_bytes = bar.update
    with bar:
        for e in entries:
            bar.set_description(str(e.ref))
            tags = [t for t in e.tags if t != LATEST]
            have = sink.find(e)
            if have is not None:
                missing = [t for t in tags if t not in have.tags]
                if missing:
                    sink.set_tags(have, missing)
                report.present.append(str(have.ref))
            else:
                got, is_temp = src.fetch(e, staging)  # digest checked by every source
                staged = got if isinstance(got, TempBlob) else None
                path = got.path if staged is not None else got
                try:
                    e = e.model_copy(update={"source": e.source or f"{src.url}#{e.ref}"})
                    if (
                        staged is not None
                        and isinstance(sink, FolderRemote)
                        and sink.registry.blobs.root == staging.root
                    ):
                        new = sink.put(e, path, tags, staged=staged)  # checked as it was written
                    else:
                        new = sink.put(e, path, tags)  # and checked again on the way in
                finally:
                    if is_temp:
                        path.unlink(missing_ok=True)
                report.copied.append(str(new.ref))
                report.url = getattr(sink, "last_url", None) or report.url
            if e.evals and hasattr(sink, "record_evals"):  # scores travel with the version
                sink.record_evals(have if have is not None else new, e.evals)
            report.tags += [f"{e.name}@{t}" for t in tags]
            if not streamed or have is not None:
                bar.update(e.size)
    return report


def pull(
    reg: RegistryStore,
    source: str,
    refs: Sequence[str] = (),
    *,
    base: BaseArg = None,
    token: str | None = None,
    progress: bool = False,
) -> TransferReport:
    """Copy expert sets from `source` into `reg`: every entry, or those `refs` name (a bare name: all versions)."""
    src = open_remote(source, token=token, source=True)
    entries = _collect(src, refs, base)
    if not entries:
        raise NotFoundError(
            f"{source} holds no expert set" + (f" matching {', '.join(refs)}" if refs else ""),
            hint="list what is there with `expertlib list --registry SOURCE` (folders) or check the names",
        )
    return transfer(src, FolderRemote(reg), entries, reg.blobs, progress=progress)


def push(
    reg: RegistryStore,
    ref: str,
    dest: str,
    *,
    base: BaseArg = None,
    token: str | None = None,
    progress: bool = False,
    **hub_options,
) -> TransferReport:
    """Copy `ref` from `reg` to `dest` (a bare name: every version; to the Hub: the latest)."""
    from expertlib.registry.evals import with_evals

    sink = open_remote(dest, token=token)
    src = FolderRemote(reg)
    if dest.startswith(HF_SCHEME):
        entries = with_evals(reg, [reg.resolve(ref, base=base)])  # scores go into the card and manifest
        sink.options.update(hub_options)
    else:
        if hub_options:
            raise InvalidNameError(f"options {sorted(hub_options)} only apply to hf:// destinations")
        entries = _collect(src, [ref], base)
    return transfer(src, sink, entries, reg.blobs, progress=progress)
