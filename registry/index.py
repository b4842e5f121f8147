"""The registry's SQLite index: bases, names (with their version counter), versions and tags.

WAL journal (or the rollback journal, `EXPERTLIB_REGISTRY_JOURNAL=delete`, for a folder that
several hosts share over NFS and the like) and a busy timeout let several processes read while
one writes; every change is one `BEGIN IMMEDIATE` transaction, which serialises writers
(version numbers are assigned inside it, so concurrent publishers never collide).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from expertlib.errors import RegistryError, RegistrySchemaError

INDEX_FILE = "index.db"
#: "delete" selects SQLite's rollback journal instead of WAL, for a registry folder that several
#: hosts share over a network filesystem (WAL needs shared memory, which such filesystems lack).
JOURNAL_ENV = "EXPERTLIB_REGISTRY_JOURNAL"
#: 2 added the `evals` table (expertlib.registry.evals); an index of version 1 gains it on first write.
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 60_000
#: Busy timeout on a server's request path: a locked index answers 503 + Retry-After quickly.
SERVING_BUSY_TIMEOUT_MS = 1_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bases (
    base_key TEXT PRIMARY KEY,
    model_type TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    name TEXT
);
CREATE TABLE IF NOT EXISTS names (
    base_key TEXT NOT NULL REFERENCES bases(base_key),
    name TEXT NOT NULL,
    next_version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (base_key, name)
);
CREATE TABLE IF NOT EXISTS versions (
    base_key TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    published_at TEXT NOT NULL,
    source TEXT,
    PRIMARY KEY (base_key, name, version),
    UNIQUE (base_key, name, digest),
    FOREIGN KEY (base_key, name) REFERENCES names(base_key, name)
);
CREATE INDEX IF NOT EXISTS versions_digest ON versions(digest);
CREATE TABLE IF NOT EXISTS tags (
    base_key TEXT NOT NULL,
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (base_key, name, tag),
    FOREIGN KEY (base_key, name, version) REFERENCES versions(base_key, name, version) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS evals (
    base_key TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    data_digest TEXT NOT NULL DEFAULT '',
    value REAL NOT NULL,
    n INTEGER,
    recorded_at TEXT NOT NULL,
    source TEXT,
    PRIMARY KEY (base_key, name, version, task, metric, data_digest),
    FOREIGN KEY (base_key, name, version) REFERENCES versions(base_key, name, version) ON DELETE CASCADE
);
"""


def connect(
    root: Path, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS, read_only: bool = False
) -> sqlite3.Connection:
    """A connection to the index; `read_only` opens it without ever writing (not even WAL files)."""
    if read_only:
        return _connect_read_only(root / INDEX_FILE, busy_timeout_ms)
    con = sqlite3.connect(str(root / INDEX_FILE), timeout=busy_timeout_ms / 1000, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("PRAGMA synchronous = FULL")
    return con


def _connect_read_only(db: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """`immutable=1` (nothing is written, not even -shm/-wal files: a mounted snapshot) unless a WAL
    file holds changes not yet in the database file; then `mode=ro`, which reads them."""
    uri = "file:" + quote(str(db.resolve()))
    last: sqlite3.Error | None = None
    wal = db.with_name(db.name + "-wal")
    pending = wal.is_file() and wal.stat().st_size > 0
    for query in ("?mode=ro", "?mode=ro&immutable=1") if pending else ("?mode=ro&immutable=1",):
        try:
            con = sqlite3.connect(uri + query, uri=True, timeout=busy_timeout_ms / 1000, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return con
        except sqlite3.OperationalError as exc:
            last = exc
    assert last is not None
    raise last


def init(root: Path) -> None:
    """Create the index if needed (idempotent, safe under concurrency)."""
    con = connect(root)
    try:
        version = check_schema(con, root)  # before anything is written to an index of a newer expertlib
        wanted = os.environ.get(JOURNAL_ENV, "").lower()
        if wanted:
            if wanted not in ("wal", "delete"):
                raise RegistryError(f"{JOURNAL_ENV} must be 'wal' or 'delete', not {wanted!r}")
            con.execute(f"PRAGMA journal_mode = {wanted.upper()}")
        if version == SCHEMA_VERSION:
            return  # already set up: take no write lock
        if not wanted:
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # e.g. a filesystem without shared memory: still correct, slower
                con.execute("PRAGMA journal_mode = DELETE")
        with transaction(con):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(  # a new index, or an older one migrated (never lowers a newer version)
                "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                (str(SCHEMA_VERSION),),
            )
    finally:
        con.close()


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; takes the write lock up front (no lock upgrades, no deadlocks)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def schema_version(con: sqlite3.Connection) -> int:
    """Schema version of an index (0 when new); RegistrySchemaError when it is not a number."""
    has_meta = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    if row is None:
        return 0
    text = str(row[0])
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise RegistrySchemaError(
            f"the registry index has an unreadable schema version {text[:20]!r}",
            hint="the index was damaged or not written by expertlib; pull its sets into a new registry",
        )
    return int(text)


def check_schema(con: sqlite3.Connection, root: Path) -> int:
    """The index's schema version; RegistrySchemaError when a newer expertlib wrote it (reading it
    as this version could misread it, and writing could damage it)."""
    version = schema_version(con)
    if version > SCHEMA_VERSION:
        raise RegistrySchemaError(
            f"the registry at {root} was written by a newer expertlib (schema {version}); "
            f"this one reads schema {SCHEMA_VERSION}",
            hint="upgrade expertlib (pip install -U expertlib) to use this registry",
        )
    return version
