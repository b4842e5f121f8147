"""The registry's storage: a folder with content-addressed blobs and an SQLite index.

`RegistryStore` publishes, versions, tags, opens, verifies and collects garbage; `expertlib.registry.
Registry` adds diff and transfers on top of it (dependencies run one way: remotes use the store).

    reg = Registry()                                  # $EXPERTLIB_REGISTRY or ~/.cache/expertlib/registry
    entry = reg.publish("math.safetensors", tags=["stable"])
    reg.resolve("math@stable").ref                    # Ref(name='math', version=1, digest='sha256:...')
    reg.open("math@1")                                # ExpertSet, opened lazily from the blob

Layout of the folder:

    index.db                       SQLite (WAL): bases, names, versions, tags
    blobs/sha256/ab/ab12....safetensors   patch files, named by the sha256 of their bytes
    tmp/                           files being written (removed by gc once their writer is gone)

Names are per base model (model_type + structural config digest): `math` for base A and
`math` for base B are different sets; a reference that matches both asks for `base=`.
Version numbers are never reused, even after `rm`. The registry stores and lists; it never
loads a model.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from expertlib.constants import DEFAULT_REGISTRY_DIR, REGISTRY_ENV
from expertlib.errors import (
    AmbiguousRefError,
    BaseMismatchError,
    DigestMismatchError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    PatchError,
    PatchShapeError,
    ReadOnlyRegistryError,
    RegistryBusyError,
    StorageFullError,
    VersionLimitError,
)
from expertlib.identity import BaseIdentity
from expertlib.patch import ExpertSet, ExpertSetManifest
from expertlib.registry import index
from expertlib.registry.blobs import BlobStore, TempBlob, stream_file, test_hook
from expertlib.registry.names import (
    LATEST,
    MAX_VERSION,
    Ref,
    RefSpec,
    parse_ref,
    validate_name,
    validate_tag,
    validate_version,
)
from expertlib.registry.protocol import Entry, GcReport, VerifyProblem, VerifyReport, base_key
from expertlib.verify import FileKey

BaseArg = BaseIdentity | str | Path | None

_SELECT = """
SELECT v.base_key, v.name, v.version, v.digest, v.size, v.manifest, v.published_at, v.source,
       b.model_type, b.config_digest, b.name AS base_name,
       (SELECT MAX(version) FROM versions m WHERE m.base_key = v.base_key AND m.name = v.name) AS latest
FROM versions v JOIN bases b ON b.base_key = v.base_key
"""


def default_root() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY_DIR).expanduser()


class RegistryStore:
    """A local expert-set registry rooted at `root` (created on first use).

    `read_only` (default: detected, a read-only folder or mount) opens an existing registry without
    writing anything, so every read works on a mounted snapshot; writes then raise
    ReadOnlyRegistryError. `busy_timeout` (seconds) is how long a call waits for another process's
    lock on the index before RegistryBusyError; a server uses a short one on its request path."""

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        read_only: bool | None = None,
        busy_timeout: float | None = None,
    ):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.blobs = BlobStore(self.root)
        self.busy_timeout_ms = int(busy_timeout * 1000) if busy_timeout is not None else index.BUSY_TIMEOUT_MS
        has_index = (self.root / index.INDEX_FILE).exists()
        if (self.root / "blobs").exists() and not has_index:
            raise IntegrityError(
                f"{self.root} has blobs but no {index.INDEX_FILE}",
                hint="this is not an expertlib registry, or its index was deleted",
            )
        self.read_only = _read_only_folder(self.root) if read_only is None else read_only
        if self.read_only:
            if not has_index:
                raise NotFoundError(
                    f"no expertlib registry at {self.root} (no {index.INDEX_FILE})",
                    hint="a read-only folder must already hold a registry",
                )
            con = self._con()
            try:
                index.check_schema(con, self.root)
            finally:
                con.close()
            return
        with _storage_errors(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            self.blobs.ensure()
            index.init(self.root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def _con(self) -> sqlite3.Connection:
        return index.connect(self.root, busy_timeout_ms=self.busy_timeout_ms, read_only=self.read_only)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyRegistryError(
                f"the registry at {self.root} is read-only",
                hint="pull the sets into a writable registry (expertlib pull SOURCE --registry DIR)",
            )

    # --- bases -----------------------------------------------------------------------------------

    def bases(self) -> list[BaseIdentity]:
        con = self._con()
        try:
            rows = con.execute(
                "SELECT model_type, config_digest, name FROM bases ORDER BY name, base_key"
            ).fetchall()
        finally:
            con.close()
        return [BaseIdentity(model_type=r[0], config_digest=r[1], name=r[2]) for r in rows]

    def _base_keys(self, con: sqlite3.Connection, base: BaseArg) -> list[str] | None:
        """None = every base; otherwise the keys a base argument matches (error when none)."""
        if base is None:
            return None
        if isinstance(base, BaseIdentity):
            return [base_key(base)]
        text = str(base)
        if Path(text, "config.json").is_file():
            from expertlib.identity import folder_identity

            return [base_key(folder_identity(text))]
        digest = text if text.startswith("sha256:") else "sha256:" + text
        rows = con.execute(
            "SELECT base_key FROM bases WHERE name = ? OR model_type = ? "
            "OR (length(?) >= 15 AND substr(config_digest, 1, length(?)) = ?)",  # a prefix, no wildcards
            (text, text, digest, digest, digest),
        ).fetchall()
        if not rows:
            known = [f"{r[0]} ({r[1][:19]}...)" for r in con.execute("SELECT name, config_digest FROM bases")]
            raise NotFoundError(
                f"no base model matches {text!r}",
                hint="known bases: " + (", ".join(known) if known else "none (the registry is empty)"),
            )
        return [r[0] for r in rows]

    # --- reading ---------------------------------------------------------------------------------

    def _entries(self, con, where: str, args: Sequence, keys: list[str] | None) -> list[Entry]:
        sql = _SELECT + " WHERE " + where
        if keys is not None:
            sql += f" AND v.base_key IN ({','.join('?' * len(keys))})"
            args = (*args, *keys)
        rows = con.execute(sql + " ORDER BY b.name, v.base_key, v.name, v.version", args).fetchall()
        return [self._entry(con, r) for r in rows]

    @staticmethod
    def _entry(con, r, *, full: bool = False) -> Entry:
        m = ExpertSetManifest.model_validate_json(r["manifest"])
        tags = [
            t[0]
            for t in con.execute(
                "SELECT tag FROM tags WHERE base_key = ? AND name = ? AND version = ? ORDER BY tag",
                (r["base_key"], r["name"], r["version"]),
            )
        ]
        if r["version"] == r["latest"]:
            tags.insert(0, LATEST)
        return Entry(
            name=r["name"],
            version=r["version"],
            digest=r["digest"],
            base=BaseIdentity(
                model_type=r["model_type"], config_digest=r["config_digest"], name=r["base_name"]
            ),
            tags=tags,
            size=r["size"],
            **Entry.manifest_fields(m),
            published_at=datetime.fromisoformat(r["published_at"]),
            source=r["source"],
            manifest=m if full else None,
        )

    def list(self, *, base: BaseArg = None, name: str | None = None) -> list[Entry]:
        """Every published version (optionally of one base and/or one name), ordered."""
        con = self._con()
        try:
            keys = self._base_keys(con, base)
            if name is not None:
                return self._entries(con, "v.name = ?", (validate_name(name),), keys)
            return self._entries(con, "1", (), keys)
        finally:
            con.close()

    def resolve(self, ref: str | RefSpec | Ref, *, base: BaseArg = None, full: bool = False) -> Entry:
        """The entry a reference names; NotFoundError or AmbiguousRefError otherwise."""
        spec = _spec(ref)
        con = self._con()
        try:
            keys = self._base_keys(con, base)
            if spec.digest is not None:
                hits = self._entries(
                    con,
                    "v.name = ? AND substr(v.digest, 1, length(?)) = ?",
                    (spec.name, spec.digest, spec.digest),
                    keys,
                )
            elif spec.version is not None:
                hits = self._entries(con, "v.name = ? AND v.version = ?", (spec.name, spec.version), keys)
            elif spec.tag in (None, LATEST):
                hits = self._entries(
                    con,
                    "v.name = ? AND v.version = (SELECT MAX(version) FROM versions m WHERE m.base_key = v.base_key AND m.name = v.name)",
                    (spec.name,),
                    keys,
                )
            else:
                hits = self._entries(
                    con,
                    "v.name = ? AND EXISTS (SELECT 1 FROM tags t WHERE t.base_key = v.base_key AND t.name = v.name "
                    "AND t.version = v.version AND t.tag = ?)",
                    (spec.name, spec.tag),
                    keys,
                )
            if not hits:
                raise self._not_found(con, spec, keys)
            if len({h.base_key for h in hits}) > 1:
                raise AmbiguousRefError(
                    f"{spec} exists for several base models: "
                    + ", ".join(
                        f"{h.base.name or h.base.model_type} ({h.base.config_digest[:19]}...)" for h in hits
                    ),
                    hint="pass --base (a base folder, name or config digest) to choose one",
                )
            if len(hits) > 1:
                raise AmbiguousRefError(
                    f"digest prefix {spec.digest} matches {len(hits)} versions of {spec.name}",
                    hint="give more digits of the digest",
                )
            hit = hits[0]
            if full:
                row = con.execute(
                    _SELECT + " WHERE v.base_key = ? AND v.name = ? AND v.version = ?",
                    (hit.base_key, hit.name, hit.version),
                ).fetchone()
                if row is None:  # removed since the lookup above
                    raise self._not_found(con, spec, keys)
                hit = self._entry(con, row, full=True)
            return hit
        finally:
            con.close()

    def _not_found(self, con, spec: RefSpec, keys: list[str] | None) -> NotFoundError:
        have = self._entries(con, "v.name = ?", (spec.name,), keys)
        if not have:
            names = sorted({r[0] for r in con.execute("SELECT DISTINCT name FROM versions")})
            return NotFoundError(
                f"no expert set named {spec.name!r} in {self.root}",
                hint="published names: "
                + (", ".join(names) if names else "none yet (use `expertlib publish`)"),
            )
        versions = ", ".join(f"{e.version}" + (f" ({', '.join(e.tags)})" if e.tags else "") for e in have)
        return NotFoundError(f"{spec} not found", hint=f"versions of {spec.name}: {versions}")

    def show(self, ref: str | RefSpec | Ref, *, base: BaseArg = None) -> Entry:
        """The entry with its full manifest."""
        return self.resolve(ref, base=base, full=True)

    def get_path(self, ref: str | RefSpec | Ref, *, base: BaseArg = None) -> Path:
        """Path of the stored patch file (read-only: never modify it)."""
        entry = self.resolve(ref, base=base)
        path = self.blobs.path(entry.digest)
        if not path.is_file():
            raise IntegrityError(
                f"blob of {entry.ref} is missing: {path}", hint="pull the set again, then `expertlib gc`"
            )
        return path

    def open(self, ref: str | RefSpec | Ref, *, base: BaseArg = None, verify: bool = True) -> ExpertSet:
        """The stored expert set, opened lazily; its file is rechecked in full against the digest it is
        stored under first, unless it is unchanged since its last full check (its verified record);
        `verify=False` skips that, for a registry only you write to."""
        path = self.get_path(ref, base=base)
        record = None
        if verify:
            entry = self.resolve(ref, base=base)
            record = self.blobs.record(entry.digest, entry.content_digest)
            problem = None if record is not None else self.check_blob(entry.digest)
            if problem:
                raise DigestMismatchError(
                    f"{entry.ref}: {problem}", path=str(path), hint="pull it again from a good copy, or rm it"
                )
        es = ExpertSet.open(path)
        return es.trust(record) if record is not None else es

    # --- publishing ------------------------------------------------------------------------------

    def publish(
        self,
        patch: str | Path | ExpertSet,
        *,
        task: str | None = None,
        tags: Iterable[str] = (),
        base: BaseIdentity | str | Path | None = None,
        expected_digest: str | None = None,
        source: str | None = None,
        version: int | None = None,
        staged: TempBlob | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Entry:
        """Validate a patch and store it as the next version of `task` (default: its manifest's task).

        The file is copied into the store in one pass that also hashes it (`BlobStore.write_temp`);
        `staged`: bytes a transfer already wrote into this store's tmp/ that way (then `patch` is that
        file). `progress(n)` is called per chunk copied (a CLI's progress bar).

        `base`, when given (an identity or a base model folder), must be the patch's base. Publishing
        bytes that this name already holds returns the existing version (tags still apply).
        `version` (used by pull/push to mirror a source's numbering) is taken when it is not below
        the next free version; otherwise the next free version is used.
        """
        self._writable()
        if version is not None:
            validate_version(version)
        if isinstance(patch, ExpertSet):
            return self._publish_in_memory(
                patch, task=task, tags=tags, base=base, source=source, version=version
            )
        path = Path(patch)
        es = ExpertSet.open(path)  # header and manifest, validated; errors name the user's file
        m = es.manifest
        try:
            name = validate_name(task or m.task)
        except InvalidNameError as exc:
            if task is None:
                exc.hint = f"the patch's task name cannot be a registry name; pass --task NAME ({exc.hint})"
            raise
        tags = [validate_tag(t) for t in tags]
        if base is not None:
            expected = base if isinstance(base, BaseIdentity) else _folder_identity(base)
            if not expected.same_base(m.base):
                raise BaseMismatchError(
                    f"the patch was made for a {m.base.model_type} base {m.base.name or ''} "
                    f"({m.base.config_digest[:19]}...), not for {expected.name or expected.model_type} "
                    f"({expected.config_digest[:19]}...)",
                    path=str(path),
                    hint="publish it under the base it was trained on",
                )
        self._check_shapes(es, base, str(path))
        if staged is None:  # one pass: copy, whole-file hash and the patch's own digests together
            staged = self.blobs.write_temp(path, expected_digest=expected_digest, progress=progress)
        elif expected_digest is not None and staged.digest != expected_digest:
            staged.path.unlink(missing_ok=True)
            raise DigestMismatchError(
                f"received bytes have digest {staged.digest[:19]}..., expected {expected_digest[:19]}...",
                hint="the transfer was damaged or the source is corrupt; run `expertlib verify` there and retry",
            )
        tmp = staged
        try:
            stored = ExpertSet.open(tmp.path)
            if stored.manifest.content_digest != m.content_digest:
                raise DigestMismatchError("the file changed while it was being published", path=str(path))
            try:
                stored.verify_streamed(tmp.stream.scan(stored.manifest) if tmp.stream else None, tmp.key)
            except PatchError as exc:
                raise type(exc)(exc.message.split(": ", 1)[-1], path=str(path), hint=exc.hint) from None
            entry = self._commit(tmp, name, m, tags, source, version)
            self.blobs.keep_record(tmp.digest, stored.checked)  # loads trust it while the blob is unchanged
            return entry
        finally:
            tmp.path.unlink(missing_ok=True)

    def _check_shapes(self, es: ExpertSet, base: BaseArg, where: str) -> None:
        """Expert shapes must be the base's: checked against the base folder when given, and against
        the sets of the same base already published (one base has one expert shape)."""
        m = es.manifest
        if not m.experts:
            return
        if (
            base is not None
            and not isinstance(base, BaseIdentity)
            and Path(str(base), "config.json").is_file()
        ):
            from expertlib.apply import check_against_base
            from expertlib.checkpoint import BaseCheckpoint

            ckpt = BaseCheckpoint(base)
            check_against_base(
                es,
                identity=ckpt.identity,
                moe_layers=ckpt.moe_layers,
                num_experts=ckpt.num_experts,
                expert_digest=None,
                hint="publish it under the base it was trained on",
                expert_shapes=ckpt.expert_shapes,
            )
        con = self._con()
        try:
            row = con.execute(
                "SELECT name, version, manifest FROM versions WHERE base_key = ? ORDER BY version LIMIT 1",
                (base_key(m.base),),
            ).fetchone()
        finally:
            con.close()
        if row is None:
            return
        other = ExpertSetManifest.model_validate_json(row["manifest"])
        if other.experts and other.expert_shapes != m.expert_shapes:
            raise PatchShapeError(
                f"expert shapes {m.expert_shapes} differ from those of {row['name']}@{row['version']} "
                f"({other.expert_shapes}), published for the same base",
                path=where,
                hint="the set was not made for this base model; re-export it from a model of this base",
            )

    def _publish_in_memory(self, es: ExpertSet, **kw) -> Entry:
        self.blobs.ensure()
        staging = self.blobs.temp_path()
        try:
            ExpertSet(es.manifest, es.tensors).save(staging)
            return self.publish(staging, **kw)
        finally:
            staging.unlink(missing_ok=True)

    def _commit(
        self, tmp: TempBlob, name: str, m: ExpertSetManifest, tags: list[str], source, wanted
    ) -> Entry:
        key = base_key(m.base)
        con = self._con()
        try:
            with index.transaction(con):
                con.execute(
                    "INSERT OR IGNORE INTO bases VALUES (?, ?, ?, ?)",
                    (key, m.base.model_type, m.base.config_digest, m.base.name),
                )
                con.execute(
                    "UPDATE bases SET name = ? WHERE base_key = ? AND name IS NULL", (m.base.name, key)
                )
                con.execute("INSERT OR IGNORE INTO names (base_key, name) VALUES (?, ?)", (key, name))
                row = con.execute(
                    "SELECT version FROM versions WHERE base_key = ? AND name = ? AND digest = ?",
                    (key, name, tmp.digest),
                ).fetchone()
                version = row[0] if row is not None else self._next_version(con, key, name, wanted)
                self.blobs.commit(tmp)  # under the write lock: gc cannot remove it before the row exists
                test_hook("commit")
                if row is None:
                    con.execute(
                        "UPDATE names SET next_version = ? WHERE base_key = ? AND name = ?",
                        (version + 1, key, name),
                    )
                    con.execute(
                        "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key,
                            name,
                            version,
                            tmp.digest,
                            tmp.size,
                            m.model_dump_json(),
                            datetime.now(timezone.utc).isoformat(),
                            source,
                        ),
                    )
                for tag in tags:
                    con.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)", (key, name, tag, version))
                return self._stored_entry(con, key, name, version)  # inside: no rm in between
        finally:
            con.close()

    @staticmethod
    def _next_version(con: sqlite3.Connection, key: str, name: str, wanted: int | None) -> int:
        """The version a new entry of `name` gets: the next free one, or `wanted` when it is higher
        (pull and push mirror the source's numbers); VersionLimitError past MAX_VERSION."""
        version = con.execute(
            "SELECT next_version FROM names WHERE base_key = ? AND name = ?", (key, name)
        ).fetchone()[0]
        if wanted is not None and wanted > version:
            version = int(wanted)
        if version > MAX_VERSION:
            raise VersionLimitError(
                f"{name} has used every version number up to the highest version, {MAX_VERSION}",
                hint="versions are never reused: publish the set under another name",
            )
        return version

    def _stored_entry(self, con: sqlite3.Connection, key: str, name: str, version: int) -> Entry:
        row = con.execute(
            _SELECT + " WHERE v.base_key = ? AND v.name = ? AND v.version = ?", (key, name, version)
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"{name}@{version} was removed while it was being changed",
                hint="`expertlib list` shows the versions there are",
            )
        return self._entry(con, row)

    # --- tags, removal, cleaning ------------------------------------------------------------------

    def tag(self, ref: str | RefSpec | Ref, tag: str, *, base: BaseArg = None) -> Entry:
        """Point the movable tag `tag` of the set's name at the version `ref` names."""
        self._writable()
        validate_tag(tag)
        entry = self.resolve(ref, base=base)
        where = (entry.base_key, entry.name, entry.version)
        con = self._con()
        try:
            with index.transaction(con):  # an `rm` since the lookup is seen here, not as a foreign-key error
                if not con.execute(
                    "SELECT 1 FROM versions WHERE base_key = ? AND name = ? AND version = ?", where
                ).fetchone():
                    raise NotFoundError(
                        f"{entry.ref} was removed while it was being tagged",
                        hint="`expertlib list` shows the versions there are",
                    )
                con.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)", (*where[:2], tag, where[2]))
                return self._stored_entry(con, *where)
        finally:
            con.close()

    def untag(self, name: str, tag: str, *, base: BaseArg = None) -> None:
        self._writable()
        validate_tag(tag)
        entry = self.resolve(RefSpec(validate_name(name), tag=tag), base=base)
        con = self._con()
        try:
            with index.transaction(con):
                con.execute(
                    "DELETE FROM tags WHERE base_key = ? AND name = ? AND tag = ?",
                    (entry.base_key, entry.name, tag),
                )
        finally:
            con.close()

    def rm(self, ref: str | RefSpec | Ref, *, base: BaseArg = None, all_versions: bool = False) -> list[Ref]:
        """Remove one version (`math@3`), or every version of a name with `all_versions`.

        The blobs stay until `gc`; version numbers are not reused.
        """
        self._writable()
        spec = _spec(ref)
        if isinstance(spec, RefSpec) and spec.selector is None and not all_versions:
            raise InvalidNameError(
                f"{spec.name!r} names every version", hint=f"remove one version ({spec.name}@N) or pass --all"
            )
        if all_versions and (spec.selector is not None):
            raise InvalidNameError(f"--all removes every version: pass the bare name {spec.name!r}")
        targets = self.list(base=base, name=spec.name) if all_versions else [self.resolve(spec, base=base)]
        if all_versions and len({e.base_key for e in targets}) > 1:
            raise AmbiguousRefError(
                f"{spec.name} exists for several base models", hint="pass --base to choose one"
            )
        if not targets:
            raise NotFoundError(f"no expert set named {spec.name!r}")
        con = self._con()
        try:
            with index.transaction(con):
                for e in targets:
                    con.execute(
                        "DELETE FROM versions WHERE base_key = ? AND name = ? AND version = ?",
                        (e.base_key, e.name, e.version),
                    )
        finally:
            con.close()
        return [e.ref for e in targets]

    def has_digest(self, digest: str) -> bool:
        """Whether some published entry uses the blob `digest`."""
        con = self._con()
        try:
            return (
                con.execute("SELECT 1 FROM versions WHERE digest = ? LIMIT 1", (digest,)).fetchone()
                is not None
            )
        finally:
            con.close()

    def _referenced(self, con) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in con.execute("SELECT digest, name, version FROM versions ORDER BY name, version"):
            out.setdefault(r[0], []).append(f"{r[1]}@{r[2]}")
        return out

    def gc(self, *, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove blobs no entry references and temp files whose writer is gone (or older than grace_s)."""
        if not dry_run:
            self._writable()
        report = GcReport(dry_run=dry_run)
        con = self._con()
        try:
            # holds off publishers between their rename and their insert
            with index.transaction(con) if not self.read_only else contextlib.nullcontext(con):
                used = self._referenced(con)
                for digest in self.blobs.iter_digests():
                    if digest not in used:
                        path = self.blobs.path(digest)
                        report.removed_blobs.append(digest)
                        report.freed_bytes += path.stat().st_size
                        if not dry_run:
                            path.unlink(missing_ok=True)
                            self.blobs.forget_record(digest)
                for tmp in self.blobs.stale_temps(grace_s):
                    report.removed_temps.append(tmp.name)
                    if not dry_run:
                        tmp.unlink(missing_ok=True)
        finally:
            con.close()
        return report

    def check_blob(self, digest: str) -> str | None:
        """None when the blob is intact, otherwise what is wrong with it."""
        path = self.blobs.path(digest)
        if not path.is_file():
            return "blob file is missing"
        key = FileKey.of(path)
        stream = stream_file(path)  # one pass: the address and the check of the tensors
        got = stream.digest()
        if got != digest:
            return f"content changed: bytes now hash to {got[:19]}..."
        try:
            es = ExpertSet.open(path)
            # also per-expert digests and finiteness (sets published earlier), from the same pass
            es.verify_streamed(stream.scan(es.manifest), key)
        except PatchError as exc:
            return f"not a valid patch: {exc.message}"
        if es.checked is not None and key is not None and es.checked.key == list(key):
            self.blobs.keep_record(digest, es.checked)
        return None

    def verify(
        self, refs: Iterable[str | RefSpec | Ref] | None = None, *, base: BaseArg = None
    ) -> VerifyReport:
        """Recompute the digest of every stored blob (or of the blobs of `refs`)."""
        con = self._con()
        try:
            integrity = con.execute("PRAGMA quick_check").fetchone()[0]
            used = self._referenced(con)
        finally:
            con.close()
        if refs is not None:
            wanted = {self.resolve(r, base=base).digest for r in refs}
            used = {d: v for d, v in used.items() if d in wanted}
        report = VerifyReport(checked=len(used))
        if integrity != "ok":
            report.problems.append(VerifyProblem(digest="-", refs=[], problem=f"index: {integrity}"))
        for digest, names in used.items():
            problem = self.check_blob(digest)
            if problem:
                report.problems.append(VerifyProblem(digest=digest, refs=names, problem=problem))
        if refs is None:
            report.unreferenced = sum(1 for d in self.blobs.iter_digests() if d not in used)
            report.stale_temps = len(self.blobs.stale_temps(3600.0))
        return report


def _spec(ref: str | RefSpec | Ref) -> RefSpec:
    if isinstance(ref, Ref):
        return RefSpec(ref.name, version=ref.version)
    if isinstance(ref, RefSpec):
        return ref
    return parse_ref(ref)


def _folder_identity(base: str | Path) -> BaseIdentity:
    from expertlib.identity import folder_identity

    return folder_identity(base)


#: "1" opens every registry read-only (e.g. a snapshot that this process could write but must not).
READ_ONLY_ENV = "EXPERTLIB_REGISTRY_READ_ONLY"


def _read_only_folder(root: Path) -> bool:
    """An existing registry folder this process cannot write (read-only mount or permissions)."""
    if not (root / index.INDEX_FILE).exists():
        return False
    if os.environ.get(READ_ONLY_ENV, "") not in ("", "0"):
        return True
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return True
    except (OSError, AttributeError):
        pass
    return not os.access(root, os.W_OK)


@contextlib.contextmanager
def _storage_errors(root: Path):
    """SQLite and file-system failures as one-line registry errors with a hint."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise RegistryBusyError(
                f"the registry index at {root} is locked by another process",
                hint="retry in a moment (a long publish or gc holds the lock)",
            ) from None
        if "disk is full" in text or "disk i/o" in text:
            raise StorageFullError(
                f"cannot write the registry at {root}: {exc}", hint="free disk space, then retry"
            ) from None
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            raise ReadOnlyRegistryError(
                f"cannot write the registry at {root}: {exc}",
                hint="it is on a read-only filesystem; pull into a writable registry instead",
            ) from None
        raise
    except OSError as exc:
        if isinstance(exc, sqlite3.Error) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        if exc.errno == errno.EROFS:
            raise ReadOnlyRegistryError(
                f"cannot write the registry at {root}: read-only filesystem",
                hint="pull into a writable registry instead",
            ) from None
        raise StorageFullError(
            f"no space left to write {exc.filename or root}",
            hint="free disk space (or `expertlib gc`), then retry; nothing was changed",
        ) from None


def translate_storage_errors(fn):
    """Method decorator: a full disk or read-only filesystem becomes one clear registry error."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with _storage_errors(self.root):
            return fn(self, *args, **kwargs)

    return wrapper


for _name in (
    "bases", "list", "resolve", "show", "get_path", "open", "publish", "tag", "untag", "rm",
    "has_digest", "gc", "verify",
):  # fmt: skip
    setattr(RegistryStore, _name, translate_storage_errors(getattr(RegistryStore, _name)))
