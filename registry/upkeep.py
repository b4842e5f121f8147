"""Changing and checking what is stored: tags, removal, garbage collection and verification."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from expertlib.errors import AmbiguousRefError, InvalidNameError, NotFoundError, PatchError
from expertlib.patch import ExpertSet
from expertlib.registry import index
from expertlib.registry.blobs import stream_file
from expertlib.registry.folder import BaseArg
from expertlib.registry.names import Ref, RefSpec, validate_name, validate_tag
from expertlib.registry.protocol import Entry, GcReport, VerifyProblem, VerifyReport
from expertlib.registry.reading import StoreReading, ref_spec
from expertlib.verify import FileKey


class StoreUpkeep(StoreReading):
    """Tags, `rm`, `gc` and `verify`."""

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
        spec = ref_spec(ref)
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
