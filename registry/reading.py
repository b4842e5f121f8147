"""Reading the registry: bases, listings, resolving a reference to one entry, opening a stored set."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from expertlib.errors import AmbiguousRefError, DigestMismatchError, IntegrityError, NotFoundError
from expertlib.identity import BaseIdentity
from expertlib.patch import ExpertSet, ExpertSetManifest
from expertlib.registry.folder import BaseArg, StoreFolder
from expertlib.registry.names import LATEST, Ref, RefSpec, parse_ref, validate_name
from expertlib.registry.protocol import Entry, base_key

_SELECT = """
SELECT v.base_key, v.name, v.version, v.digest, v.size, v.manifest, v.published_at, v.source,
       b.model_type, b.config_digest, b.name AS base_name,
       (SELECT MAX(version) FROM versions m WHERE m.base_key = v.base_key AND m.name = v.name) AS latest
FROM versions v JOIN bases b ON b.base_key = v.base_key
"""


class StoreReading(StoreFolder):
    """The registry's queries (no writes)."""

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
        spec = ref_spec(ref)
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

    def get_path(self, ref: str | RefSpec | Ref | Entry, *, base: BaseArg = None) -> Path:
        """Path of the stored patch file (read-only: never modify it). An Entry is not looked up again."""
        entry = ref if isinstance(ref, Entry) else self.resolve(ref, base=base)
        path = self.blobs.path(entry.digest)
        if not path.is_file():
            raise IntegrityError(
                f"blob of {entry.ref} is missing: {path}", hint="pull the set again, then `expertlib gc`"
            )
        return path

    def open(
        self, ref: str | RefSpec | Ref | Entry, *, base: BaseArg = None, verify: bool = True
    ) -> ExpertSet:
        """The stored expert set, opened lazily; its file is rechecked in full against the digest it is
        stored under first, unless it is unchanged since its last full check (its verified record);
        `verify=False` skips that, for a registry only you write to. `ref` is resolved once (an Entry
        `resolve` returned is not looked up again)."""
        entry = ref if isinstance(ref, Entry) else self.resolve(ref, base=base)
        path = self.get_path(entry)
        record = None
        if verify:
            record = self.blobs.record(entry.digest, entry.content_digest)
            problem = None if record is not None else self.check_blob(entry.digest)
            if problem:
                raise DigestMismatchError(
                    f"{entry.ref}: {problem}", path=str(path), hint="pull it again from a good copy, or rm it"
                )
        es = ExpertSet.open(path)
        return es.trust(record) if record is not None else es

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


def ref_spec(ref: str | RefSpec | Ref) -> RefSpec:
    if isinstance(ref, Ref):
        return RefSpec(ref.name, version=ref.version)
    if isinstance(ref, RefSpec):
        return ref
    return parse_ref(ref)
