"""Publishing: validate a patch, copy it into the blob store in one hashing pass, and commit its
version (and tags) to the index in one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from expertlib.errors import (
    BaseMismatchError,
    DigestMismatchError,
    InvalidNameError,
    PatchError,
    PatchShapeError,
    VersionLimitError,
)
from expertlib.identity import BaseIdentity
from expertlib.patch import ExpertSet, ExpertSetManifest
from expertlib.registry import index
from expertlib.registry.blobs import TempBlob, test_hook
from expertlib.registry.folder import BaseArg
from expertlib.registry.names import MAX_VERSION, validate_name, validate_tag, validate_version
from expertlib.registry.protocol import Entry, base_key
from expertlib.registry.reading import StoreReading


class StorePublishing(StoreReading):
    """`publish`: a new version of a set (or the existing one holding the same bytes)."""

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


def _folder_identity(base: str | Path) -> BaseIdentity:
    from expertlib.identity import folder_identity

    return folder_identity(base)
