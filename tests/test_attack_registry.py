"""Attack cases against the registry and the patch manifest (second hardening pass).

One test per case of the attack report, named after it; each failed on the code before its fix.
The registry's HTTP routes run in process (TestClient); `HttpRemote` talks to them, or to a mock
transport serving hostile answers, through an httpx client. Crafted files are written here.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from expertlib.constants import MANIFEST_METADATA_KEY, PATCH_FORMAT_VERSION, UNVERSIONED_FORMAT
from expertlib.errors import (
    InvalidNameError,
    NotFoundError,
    PatchCorruptError,
    RegistryError,
    RemoteError,
)
from expertlib.jsonsafe import MAX_MANIFEST_DEPTH
from expertlib.patch import ExpertSet
from expertlib.registry import Registry
from expertlib.registry.client import HttpRemote
from expertlib.registry.hub import HubRemote
from expertlib.registry.index import SCHEMA_VERSION
from expertlib.registry.names import MAX_VERSION, parse_ref
from expertlib.registry.remotes import FolderRemote, transfer
from expertlib.registry.testing import tiny_base_identity, write_expert_set
from expertlib.server.registry_app import registry_app
from expertlib.verify import digests_of

BASE = tiny_base_identity()
PAST = MAX_VERSION + 1  # 2^31: what the old code stored after a push of 2^31 - 1 and a publish


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "reg")


def patch(tmp_path: Path, seed: int, task: str = "math") -> Path:
    return write_expert_set(
        tmp_path / f"{task}-{seed}.safetensors", task, BASE, {0: [1 + seed % 3]}, seed=seed
    )


def client(reg: Registry) -> TestClient:
    """The standalone registry app in process; a 500 comes back as a response, not an exception."""
    return TestClient(registry_app(reg), raise_server_exceptions=False)


def http_remote(reg: Registry) -> HttpRemote:
    """An HttpRemote whose requests go to the registry app in process."""
    return HttpRemote("http://testserver/v1/registry", client=TestClient(
        registry_app(reg), base_url="http://testserver/v1/registry/", raise_server_exceptions=False
    ))  # fmt: skip


def http_push(c: TestClient, path: Path, name: str, **params) -> httpx.Response:
    from expertlib.registry.blobs import file_digest

    data = path.read_bytes()
    digest = file_digest(path)  # the address a registry stores it under
    return c.post("/v1/registry/entries", params={"name": name, "digest": digest, **params}, content=data)


def blobs(reg: Registry) -> list[Path]:
    return sorted(p for p in (reg.root / "blobs").rglob("*") if p.is_file())


def legacy_past_the_maximum(reg: Registry, tmp_path: Path) -> None:
    """What the old code left behind: math@2^31 stored, the name's counter at 2^31 + 1."""
    reg.publish(patch(tmp_path, 0), tags=["stable"])
    con = sqlite3.connect(reg.root / "index.db")
    with con:
        con.execute("UPDATE versions SET version = ? WHERE name = 'math'", (PAST,))
        con.execute("UPDATE tags SET version = ? WHERE name = 'math'", (PAST,))
        con.execute("UPDATE names SET next_version = ? WHERE name = 'math'", (PAST + 1,))
    con.close()


def rewrite_header(src: Path, dst: Path, edit) -> Path:
    """`src` with its safetensors header JSON replaced by `edit(header_text)` (padded to 8 bytes)."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    text = edit(data[8 : 8 + n].decode())
    raw = text.encode() + b" " * (-len(text.encode()) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return dst


def with_manifest(src: Path, dst: Path, change) -> Path:
    """`src` with its manifest dict passed through `change` (the tensors untouched)."""

    def edit(text: str) -> str:
        header = json.loads(text)
        manifest = json.loads(header["__metadata__"][MANIFEST_METADATA_KEY])
        header["__metadata__"][MANIFEST_METADATA_KEY] = change(manifest)
        return json.dumps(header)

    return rewrite_header(src, dst, edit)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- versions past the maximum -----------------------------------------------------------------


def test_push_of_the_highest_version_then_publish_is_refused_cleanly(reg, tmp_path):
    """Version 2^31 - 1 pushed, then the name published again: the old code stored 2^31, after which
    every listing failed. Now the publish is refused and the registry stays readable."""
    c = client(reg)
    r = http_push(c, patch(tmp_path, 0), "math", version=str(MAX_VERSION))
    assert r.status_code == 201 and r.json()["version"] == MAX_VERSION
    with pytest.raises(RegistryError, match="highest version") as exc:
        reg.publish(patch(tmp_path, 1))
    assert "another name" in exc.value.hint
    r = http_push(c, patch(tmp_path, 2), "math")
    assert r.status_code == 409 and "highest version" in r.json()["error"]["message"]
    assert [e.version for e in reg.list()] == [MAX_VERSION]
    assert c.get("/v1/registry/entries").status_code == 200
    assert len(blobs(reg)) == 1  # the refused bytes did not stay as a blob
    # the same bytes again are the existing version, not a new one
    assert reg.publish(reg.get_path("math")).version == MAX_VERSION
    assert reg.rm(f"math@{MAX_VERSION}")[0].version == MAX_VERSION
    with pytest.raises(RegistryError, match="highest version"):  # versions are never reused
        reg.publish(patch(tmp_path, 1))


@pytest.mark.parametrize("version", [PAST, 2**63 - 1, 2**64])
def test_version_past_the_maximum_on_publish_or_push_is_a_clear_error(version, reg, tmp_path):
    """2^63 - 1 on push was a 500 (SQLite overflow); 2^31 was stored and broke every listing."""
    with pytest.raises(InvalidNameError, match=f"1 to {MAX_VERSION}"):
        reg.publish(patch(tmp_path, 0), version=version)
    r = http_push(client(reg), patch(tmp_path, 0), "math", version=str(version))
    assert r.status_code == 400 and "version" in r.json()["error"]["message"]
    assert reg.list() == [] and blobs(reg) == []


def test_version_past_the_maximum_is_refused_on_pull_and_push(reg, tmp_path):
    """A source whose index holds math@2^31 (folder, or listed over HTTP): the copy is refused with
    the range, and nothing enters the destination."""
    legacy = Registry(tmp_path / "legacy")
    legacy_past_the_maximum(legacy, tmp_path)
    with pytest.raises(InvalidNameError, match=f"1 to {MAX_VERSION}"):
        reg.pull(str(legacy.root))
    src = http_remote(legacy)
    with pytest.raises(InvalidNameError, match=f"1 to {MAX_VERSION}"):
        transfer(src, FolderRemote(reg), src.entries(None, None), reg.blobs)
    with pytest.raises(InvalidNameError, match=f"1 to {MAX_VERSION}"):
        legacy.push("math", str(tmp_path / "dest"))
    with pytest.raises(RemoteError, match="400"):
        transfer(FolderRemote(legacy), http_remote(reg), legacy.list(), legacy.blobs)
    with pytest.raises(InvalidNameError, match=f"1 to {MAX_VERSION}"):  # checked before any upload
        HubRemote("me/math").put(legacy.resolve("math"), legacy.get_path("math"), [])
    assert reg.list() == [] and blobs(reg) == []


def test_index_holding_a_version_past_the_maximum_still_lists_serves_and_removes(reg, tmp_path):
    """An index the old code wrote (math@2^31): listing, GET /v1/models (the server's catalog) and
    the registry routes answered 500, and `rm` could not name the entry."""
    from expertlib.server.sets import SetCatalog

    legacy_past_the_maximum(reg, tmp_path)
    assert [(e.version, e.tags) for e in reg.list()] == [(PAST, ["latest", "stable"])]
    assert reg.resolve(f"math@{PAST}").version == PAST
    assert reg.resolve("math@stable").version == PAST
    catalog = SetCatalog(None, "tiny", reg)
    assert [str(r) for r in catalog.registered()] == [f"math@{PAST}"]
    assert catalog._registry_resolve(f"math@{PAST}").version == PAST
    c = client(reg)
    assert c.get("/v1/registry/entries").json()["entries"][0]["version"] == PAST
    assert c.get(f"/v1/registry/entries/math@{PAST}").status_code == 200
    with pytest.raises(RegistryError, match="highest version"):
        reg.publish(patch(tmp_path, 1))
    assert [r.version for r in reg.rm(f"math@{PAST}")] == [PAST]
    assert reg.list() == []
    with pytest.raises(InvalidNameError, match="too large"):
        reg.resolve(f"math@{2**63}")


# --- tag racing rm -------------------------------------------------------------------------------


def test_tag_racing_rm_is_not_found_not_a_raw_sqlite_error(reg, tmp_path, monkeypatch):
    """`tag` resolved the version, `rm` removed it, the tag insert then hit the foreign key:
    a raw sqlite3.IntegrityError (HTTP 500) in 17 of 300 calls."""
    for seed in range(3):
        reg.publish(patch(tmp_path, seed))
    # the race, made certain: the version goes away between tag's lookup and its write
    other = Registry(reg.root)
    resolve = Registry.resolve

    def resolve_then_rm(self, ref, **kw):
        entry = resolve(self, ref, **kw)
        if self is reg:
            other.rm(str(entry.ref))
        return entry

    monkeypatch.setattr(Registry, "resolve", resolve_then_rm)
    with pytest.raises(NotFoundError, match="math@1 was removed"):
        reg.tag("math@1", "stable")
    monkeypatch.undo()
    c = client(reg)
    monkeypatch.setattr(Registry, "resolve", resolve_then_rm)
    r = c.post("/v1/registry/tags", json={"ref": "math@2", "tag": "stable"})
    assert r.status_code == 404 and "was removed" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert [(e.version, e.tags) for e in reg.list()] == [(3, ["latest"])]

    # and the real thing: threads tagging and removing the same versions
    n = 24
    for seed in range(3, 3 + n):
        reg.publish(patch(tmp_path, seed))
    versions = [e.version for e in reg.list()][1:]
    raised: list[BaseException] = []

    def run(fn):
        for v in versions:
            try:
                fn(v)
            except NotFoundError:
                pass
            except BaseException as exc:  # noqa: BLE001 - collected and shown by the assert
                raised.append(exc)

    threads = [
        threading.Thread(target=run, args=(lambda v: Registry(reg.root).tag(f"math@{v}", "t"),)),
        threading.Thread(target=run, args=(lambda v: Registry(reg.root).rm(f"math@{v}"),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not raised, raised[:3]
    assert [e.version for e in reg.list()] == [3]


# --- deeply nested JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_in_a_patch_header_is_a_patch_error(depth, reg, tmp_path):
    """A header entry nested 100,000 deep was a RecursionError with a full traceback."""
    bad = rewrite_header(
        patch(tmp_path, 0),
        tmp_path / "bad.safetensors",
        lambda t: t.rstrip()[:-1] + f', "x": {nested(depth)}}}',
    )
    with pytest.raises(PatchCorruptError, match="nested deeper than") as exc:
        ExpertSet.open(bad)
    assert "bad.safetensors" in str(exc.value)
    r = http_push(client(reg), bad, "math")
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "nested deeper than" in message
    assert message.startswith("the pushed body of math: ") and str(reg.root) not in message
    assert reg.list() == [] and blobs(reg) == []


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_in_a_manifest_is_a_patch_error(depth, reg, tmp_path):
    """Provenance nested 100 deep was opened, then failed to serialise at publish (a 500 on push);
    100,000 deep was a RecursionError."""
    bad = with_manifest(patch(tmp_path, 0), tmp_path / "deep.safetensors", deep_provenance(depth))
    with pytest.raises(PatchCorruptError, match="manifest.*nested deeper than") as exc:
        ExpertSet.open(bad)
    assert "deep.safetensors" in str(exc.value)
    with pytest.raises(PatchCorruptError):
        reg.publish(bad)
    r = http_push(client(reg), bad, "math")
    assert r.status_code == 400 and "nested deeper than" in r.json()["error"]["message"]
    assert reg.list() == [] and blobs(reg) == []
    # the deepest manifest accepted opens, and still travels in the registry's wire forms
    deepest = deep_provenance(MAX_MANIFEST_DEPTH - 3)  # manifest -> provenance -> extra {"x": ...}
    ok = with_manifest(patch(tmp_path, 0), tmp_path / "ok.safetensors", deepest)
    assert reg.publish(ok).version == 1
    assert http_remote(reg).entries(parse_ref("math@1"), None)[0].manifest.provenance.extra["x"]
    too_deep = with_manifest(
        patch(tmp_path, 0), tmp_path / "deeper.safetensors", deep_provenance(MAX_MANIFEST_DEPTH - 2)
    )
    with pytest.raises(PatchCorruptError, match="nested deeper than"):
        ExpertSet.open(too_deep)


def deep_provenance(depth: int):
    """A manifest edit: `provenance.extra` = {"x": arrays nested `depth` deep}."""

    def change(m: dict) -> str:
        m["provenance"]["extra"] = {"x": 0}
        return json.dumps(m).replace('{"x": 0}', '{"x": ' + nested(depth) + "}")

    return change


def test_deeply_nested_json_in_a_remote_listing_is_a_remote_error(tmp_path):
    """A remote whose listing (or error body) nests 100,000 deep: a RecursionError traceback."""
    deep = nested(100_000).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        status = 500 if "entries/" in request.url.path else 200
        return httpx.Response(status, content=deep, headers={"content-type": "application/json"})

    remote = HttpRemote("http://remote/v1/registry", client=httpx.Client(
        base_url="http://remote/v1/registry/", transport=httpx.MockTransport(answer)
    ))  # fmt: skip
    with pytest.raises(RemoteError, match="nested deeper than"):
        remote.entries(None, None)
    with pytest.raises(RemoteError, match="500"):
        remote.entries(parse_ref("math@1"), None)
    shallow = json.dumps({"wire_version": 1, "entries": json.loads(nested(80))}).encode()
    remote = HttpRemote("http://remote/v1/registry", client=httpx.Client(
        base_url="http://remote/v1/registry/", transport=httpx.MockTransport(lambda r: httpx.Response(200, content=shallow))
    ))  # fmt: skip
    with pytest.raises(RemoteError, match="nested deeper than"):
        remote.entries(None, None)


def test_deeply_nested_json_body_to_the_registry_routes_is_a_4xx(reg, tmp_path):
    """Every JSON body the registry's HTTP routes read goes through the same bounded loader."""
    reg.publish(patch(tmp_path, 0))
    c = client(reg)
    for body in (nested(10_000), json.dumps({"ref": "math@1", "tag": json.loads(nested(80))})):
        r = c.post("/v1/registry/tags", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "nested deeper than" in r.json()["error"]["message"]
    r = c.post("/v1/registry/tags", json={"ref": "math@1", "tag": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tag"
    r = c.post("/v1/registry/tags", json={"ref": "math@1", "tag": "stable"})
    assert r.status_code == 200 and r.json()["tags"] == ["latest", "stable"]


# --- manifest types ----------------------------------------------------------------------------------


def test_format_version_as_a_string_is_refused(tmp_path):
    """`format_version: "2"` was coerced to 2 and the patch opened."""
    good = patch(tmp_path, 0)
    for value in ("2", "1", 1.0, True):
        bad = with_manifest(
            good, tmp_path / "bad.safetensors", lambda m, v=value: json.dumps(m | {"format_version": v})
        )
        with pytest.raises(PatchCorruptError, match="format_version"):
            ExpertSet.open(bad)
    # patches as every expertlib wrote them still open: an integer version, or none (the default)
    assert ExpertSet.open(good).manifest.format_version == PATCH_FORMAT_VERSION
    es = ExpertSet.open(good)
    sha = digests_of(es.tensors, es.manifest.experts, UNVERSIONED_FORMAT)  # what an older writer recorded

    def unversioned(m: dict) -> str:
        m = {k: v for k, v in m.items() if k != "format_version"}
        return json.dumps(m | {"content_digest": sha.content_digest, "expert_digests": sha.expert_digests})

    old = with_manifest(good, tmp_path / "old.safetensors", unversioned)
    assert ExpertSet.open(old).manifest.format_version == UNVERSIONED_FORMAT  # an older writer's
    ExpertSet.open(old).verify()


# --- index schema and LIKE patterns ----------------------------------------------------------------


def test_registry_index_of_a_newer_schema_is_refused(reg, tmp_path):
    """An index of a newer schema was read (and written) as this version without a word."""
    reg.publish(patch(tmp_path, 0))
    newer = SCHEMA_VERSION + 1
    con = sqlite3.connect(reg.root / "index.db")
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(newer),))
    con.close()
    before = (reg.root / "index.db").read_bytes()
    for read_only in (None, True):
        with pytest.raises(RegistryError, match=rf"newer expertlib \(schema {newer}\)") as exc:
            Registry(reg.root, read_only=read_only)
        assert "upgrade" in exc.value.hint
    with pytest.raises(RegistryError, match="newer expertlib"):
        Registry(tmp_path / "other").pull(str(reg.root))
    assert (reg.root / "index.db").read_bytes() == before
    con = sqlite3.connect(reg.root / "index.db")
    with con:
        con.execute("UPDATE meta SET value = 'x' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(RegistryError, match="schema"):
        Registry(reg.root)


@pytest.mark.parametrize("pattern", ["%" * 8, "_" * 8, "sha256:%%%%%%%%", "%" * 64])
def test_base_filter_is_not_a_like_pattern(pattern, reg, tmp_path):
    """`base=%...` matched every base as an SQL LIKE wildcard."""
    reg.publish(patch(tmp_path, 0))
    with pytest.raises(NotFoundError, match="no base model matches"):
        reg.list(base=pattern)
    r = client(reg).get("/v1/registry/entries", params={"base": pattern})
    assert r.status_code == 404
    # a real digest prefix still selects the base
    assert [str(e.ref) for e in reg.list(base=BASE.config_digest[:20])] == ["math@1"]
    assert [str(e.ref) for e in reg.list(base=BASE.config_digest.removeprefix("sha256:")[:12])] == ["math@1"]


def test_json_nesting_is_measured_on_the_text_and_strings_do_not_count():
    """The depth check runs on the raw text before parsing: brackets, quotes and backslashes inside
    strings must not count, and it must agree with the parsed value's nesting."""
    import random

    from expertlib.jsonsafe import nesting

    def value(rng: random.Random, depth: int):
        r = rng.random()
        if depth > 6 or r < 0.3:
            return rng.choice([1, None, 2.5, 'a[\\"{]"}\\', "\\", '"', "[[[", "]", "é[ü"])
        if r < 0.65:
            return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {
            rng.choice(["k", "[", '\\"', "}"]) + str(i): value(rng, depth + 1)
            for i in range(rng.randint(0, 3))
        }

    def depth_of(v) -> int:
        if not isinstance(v, (dict, list)):
            return 0
        return 1 + max((depth_of(c) for c in (v.values() if isinstance(v, dict) else v)), default=0)

    rng = random.Random(0)
    for _ in range(500):
        v = value(rng, 0)
        text = json.dumps(v, ensure_ascii=rng.random() < 0.5)
        assert nesting(text.encode()) == depth_of(v), text
