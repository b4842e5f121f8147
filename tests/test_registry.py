"""Local registry: names and references, publish/resolve/tag/rm/gc/verify, base identity checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from expertlib.errors import (
    AmbiguousRefError,
    BaseMismatchError,
    DigestMismatchError,
    IntegrityError,
    InvalidNameError,
    NotFoundError,
    PatchFormatError,
)
from expertlib.registry import LATEST, Ref, RefSpec, Registry, parse_ref, validate_name, validate_tag
from expertlib.registry.testing import make_expert_set, tiny_base_identity, write_expert_set

BASE = tiny_base_identity("qwen2_moe")
OTHER_BASE = tiny_base_identity("mixtral")


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg")


def patch(tmp_path: Path, task="math", seed=0, experts=None, base=BASE, name=None) -> Path:
    return write_expert_set(
        tmp_path / (name or f"{task}-{seed}.safetensors"), task, base, experts or {0: [1, 2]}, seed=seed
    )


# --- names -----------------------------------------------------------------------------------------

BAD_NAMES = [
    "",
    "a/b",
    "a\\b",
    "/abs",
    "..",
    "a..b",
    "../etc",
    ".",
    ".hidden",
    "-flag",
    "a b",
    "a\x00b",
    "a\nb",
    "tab\t",
    "a\u200bb",  # zero-width space
    "a" * 101,
    "a@b",
    "a:b",
    "C:\\x",
    "na\u00efve",  # non-ASCII
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_everywhere(name, reg, tmp_path):
    with pytest.raises(InvalidNameError):
        validate_name(name)
    with pytest.raises(InvalidNameError):
        validate_tag(name)
    if name:
        with pytest.raises(InvalidNameError):
            reg.publish(patch(tmp_path), task=name)
    assert reg.list() == []


@pytest.mark.parametrize("name", ["math", "Math-2", "gsm8k.v2", "a_b+c", "x" * 100, "7b"])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("tag", ["3", "latest", "sha256:abc"])
def test_bad_tags(tag):
    with pytest.raises(InvalidNameError):
        validate_tag(tag)


def test_parse_ref():
    assert parse_ref("math") == RefSpec("math")
    assert parse_ref("math@3") == RefSpec("math", version=3)
    assert parse_ref("math@stable") == RefSpec("math", tag="stable")
    assert parse_ref("math@latest") == RefSpec("math", tag=LATEST)
    d = "sha256:" + "ab" * 32
    assert parse_ref(f"math@{d}") == RefSpec("math", digest=d)
    assert parse_ref("math@sha256:abcdef12").digest == "sha256:abcdef12"
    assert parse_ref("math@blake3:abcdef12").digest == "blake3:abcdef12"
    for bad in [
        "",
        "math@",
        "math@0",
        "@3",
        "math@sha256:xyz",
        "math@sha256:abc",
        "math@sha256:" + "a" * 65,
        "math@blake3:abc",
        "math@md5:abcdef12",
        "a/b@1",
    ]:
        with pytest.raises(InvalidNameError):
            parse_ref(bad)
    r = Ref("math", 3, d)
    assert str(r) == "math@3" and r.pinned == f"math@{d}"
    with pytest.raises(AttributeError):
        r.version = 4  # frozen


# --- publish and resolve ------------------------------------------------------------------------------


def test_publish_versions_tags_digests(reg, tmp_path):
    e1 = reg.publish(patch(tmp_path, seed=1), tags=["stable"])
    e2 = reg.publish(patch(tmp_path, seed=2))
    assert (e1.version, e2.version) == (1, 2)
    assert e1.digest != e2.digest and e1.digest.startswith("blake3:") and len(e1.digest) == 71
    assert reg.resolve("math").ref == e2.ref
    assert reg.resolve("math@latest").ref == e2.ref
    assert reg.resolve("math@stable").ref == e1.ref
    assert reg.resolve("math@1").ref == e1.ref
    assert reg.resolve(f"math@{e1.digest}").ref == e1.ref
    assert reg.resolve(f"math@{e1.digest[:15]}").ref == e1.ref
    assert [e.tags for e in reg.list()] == [["stable"], [LATEST]]
    # tags move; latest follows the highest version
    reg.tag("math@2", "stable")
    assert reg.resolve("math@stable").version == 2
    reg.untag("math", "stable")
    with pytest.raises(NotFoundError):
        reg.resolve("math@stable")
    # the file in the registry is the published bytes, content-addressed
    path = reg.get_path("math@1")
    assert path.read_bytes() == (tmp_path / "math-1.safetensors").read_bytes()
    assert reg.open("math@1", verify=True).manifest.content_digest == e1.content_digest
    assert reg.show("math@1").manifest.task == "math"


def test_republishing_same_bytes_is_idempotent(reg, tmp_path):
    p = patch(tmp_path, seed=1)
    e1 = reg.publish(p)
    e2 = reg.publish(p, tags=["again"])
    assert e1.ref == e2.ref and "again" in e2.tags
    assert len(reg.list()) == 1
    # the same bytes under another name are another entry sharing the blob
    e3 = reg.publish(p, task="algebra")
    assert e3.ref == Ref("algebra", 1, e1.digest)
    assert len(list(reg.blobs.iter_digests())) == 1


def test_in_memory_publish(reg):
    es = make_expert_set("code", BASE, {1: [0, 7]}, seed=5)
    e = reg.publish(es, tags=["v"])
    assert e.ref.name == "code" and e.experts == {1: [0, 7]}
    assert list(reg.blobs.tmp_dir.iterdir()) == []


def test_versions_are_never_reused(reg, tmp_path):
    for s in range(3):
        reg.publish(patch(tmp_path, seed=s), tags=["stable"] if s == 2 else ())
    with pytest.raises(InvalidNameError, match="--all"):
        reg.rm("math")
    assert [str(r) for r in reg.rm("math@stable")] == ["math@3"]
    with pytest.raises(NotFoundError):  # the tag went with the version
        reg.resolve("math@stable")
    assert reg.resolve("math").version == 2
    assert reg.publish(patch(tmp_path, seed=9)).version == 4
    assert len(reg.rm("math", all_versions=True)) == 3
    with pytest.raises(NotFoundError):
        reg.resolve("math")
    assert reg.publish(patch(tmp_path, seed=10)).version == 5


def test_not_found_messages(reg, tmp_path):
    with pytest.raises(NotFoundError, match="none yet"):
        reg.resolve("math")
    reg.publish(patch(tmp_path))
    with pytest.raises(NotFoundError) as exc:
        reg.resolve("math@7")
    assert "versions of math: 1 (latest)" in exc.value.hint
    with pytest.raises(NotFoundError, match="published names: math"):
        reg.resolve("code")


def test_names_are_per_base(reg, tmp_path):
    a = reg.publish(patch(tmp_path, seed=1))
    b = reg.publish(patch(tmp_path, seed=2, base=OTHER_BASE, name="other.safetensors"))
    assert a.version == b.version == 1  # separate version counters
    with pytest.raises(AmbiguousRefError, match="several base models"):
        reg.resolve("math")
    assert reg.resolve("math", base=BASE).digest == a.digest
    assert reg.resolve("math", base="tiny-mixtral").digest == b.digest
    assert reg.resolve("math", base=OTHER_BASE.config_digest[:20]).digest == b.digest
    assert [e.digest for e in reg.list(base="mixtral")] == [b.digest]
    with pytest.raises(NotFoundError, match="known bases"):
        reg.list(base="nope")


def test_base_mismatch_refused(reg, tmp_path, tiny_model_dir):
    p = patch(tmp_path)
    with pytest.raises(BaseMismatchError):
        reg.publish(p, base=OTHER_BASE)
    with pytest.raises(BaseMismatchError):
        reg.publish(p, base=tiny_model_dir("mixtral"))  # a folder: identity from config.json only
    assert reg.list() == []
    assert reg.publish(p, base=tiny_model_dir("qwen2_moe")).version == 1


def test_invalid_patches_refused(reg, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04pickle")
    with pytest.raises(PatchFormatError):
        reg.publish(junk)
    p = patch(tmp_path)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte: header fine, content digest wrong
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as exc:
        reg.publish(bad)
    assert str(bad) in str(exc.value)
    assert reg.list() == [] and list(reg.blobs.iter_digests()) == []
    assert list(reg.blobs.tmp_dir.iterdir()) == []
    with pytest.raises(DigestMismatchError):
        reg.publish(p, expected_digest="sha256:" + "0" * 64)


# --- verify and gc ------------------------------------------------------------------------------------


def test_verify_detects_corrupt_and_missing_blobs(reg, tmp_path):
    e1 = reg.publish(patch(tmp_path, seed=1))
    e2 = reg.publish(patch(tmp_path, seed=2))
    assert reg.verify().ok and reg.verify().checked == 2
    blob = reg.blobs.path(e1.digest)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    report = reg.verify()
    assert not report.ok
    assert [(p.digest, p.refs) for p in report.problems] == [(e1.digest, ["math@1"])]
    assert "content changed" in report.problems[0].problem
    assert reg.verify(["math@2"]).ok
    with pytest.raises(DigestMismatchError):
        reg.open("math@1", verify=True)
    reg.blobs.path(e2.digest).unlink()
    assert {p.digest for p in reg.verify().problems} == {e1.digest, e2.digest}
    with pytest.raises(IntegrityError, match="missing"):
        reg.get_path("math@2")


def test_gc_removes_unreferenced_blobs_and_stale_temps(reg, tmp_path):
    import socket
    import subprocess
    import sys

    reg.publish(patch(tmp_path, seed=1))
    e2 = reg.publish(patch(tmp_path, seed=2))
    reg.rm("math@2")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = reg.blobs.tmp_dir / f"{socket.gethostname()}.{int(dead.stdout)}.abc.part"
    stale.write_bytes(b"partial")
    live = reg.blobs.tmp_dir / f"{socket.gethostname()}.{os.getpid()}.def.part"
    live.write_bytes(b"being written")
    v = reg.verify()
    assert v.ok and v.unreferenced == 1 and v.stale_temps == 1
    dry = reg.gc(dry_run=True)
    assert dry.removed_blobs == [e2.digest] and reg.blobs.has(e2.digest)
    report = reg.gc()
    assert report.removed_blobs == [e2.digest] and report.freed_bytes == e2.size
    assert report.removed_temps == [stale.name]
    assert not reg.blobs.has(e2.digest) and not stale.exists() and live.exists()
    assert reg.verify().ok and len(reg.list()) == 1
    assert reg.gc(grace_s=0).removed_temps == [live.name]  # old enough counts as stale too


def test_registry_root_from_env(tmp_path, monkeypatch):
    from expertlib.constants import REGISTRY_ENV

    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "envreg"))
    assert Registry().root == tmp_path / "envreg"
    assert (tmp_path / "envreg" / "index.db").is_file()


def test_rollback_journal_for_shared_filesystems(tmp_path, monkeypatch):
    import sqlite3

    from expertlib.registry.index import JOURNAL_ENV

    monkeypatch.setenv(JOURNAL_ENV, "delete")
    reg = Registry(tmp_path / "shared")
    assert reg.publish(patch(tmp_path)).version == 1
    con = sqlite3.connect(tmp_path / "shared" / "index.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    monkeypatch.delenv(JOURNAL_ENV)
    assert Registry(tmp_path / "shared").resolve("math").version == 1  # an existing index keeps its mode
