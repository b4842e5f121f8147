"""A registry blob's address: a tree over the tensors' own leaves for format 3 patches and later (one
hash pass gives the address and the check; BLAKE3 from format 4, sha256 for format 3), the sha256 of
the whole file for older files, which keep it."""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from test_load_speed_paths import make_set, tree_address

from expertlib.constants import MANIFEST_METADATA_KEY, PATCH_FORMAT_VERSION
from expertlib.errors import DigestMismatchError
from expertlib.patch import ExpertSet, tensors_digest
from expertlib.registry import Registry
from expertlib.registry.blobs import file_digest
from expertlib.verify import BLAKE3_FORMAT, BLOB_TREE_FORMAT, blob_digest, digests_of


def plain(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def with_header(path: Path, out: Path, edit) -> Path:
    """A copy of the safetensors file at `path` whose header JSON text went through `edit`."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = edit(data[8 : 8 + n].decode()).encode()
    out.write_bytes(struct.pack("<Q", len(head)) + head + data[8 + n :])
    return out


def older(es: ExpertSet, version: int | None, path: Path) -> Path:
    """The set written as an older expertlib wrote it: format 1, 2 or 3, or no version field at all."""
    m = es.manifest
    if version == 1:
        m = m.model_copy(
            update={
                "format_version": 1,
                "content_digest": tensors_digest(es.tensors),
                "expert_digests": {f"{layer}.{e}": w.digest() for (layer, e), w in es.experts()},
            }
        )
    else:
        scan = digests_of(es.tensors, m.experts, version or 2)
        m = m.model_copy(
            update={
                "format_version": version or 2,
                "content_digest": scan.content_digest,
                "expert_digests": scan.expert_digests,
            }
        )
    path = ExpertSet(m, dict(es.tensors)).save(path)
    if version is None:

        def drop(text: str) -> str:
            header = json.loads(text)
            manifest = json.loads(header["__metadata__"][MANIFEST_METADATA_KEY])
            del manifest["format_version"]
            header["__metadata__"][MANIFEST_METADATA_KEY] = json.dumps(manifest)
            return json.dumps(header)

        path = with_header(path, path.with_name("noversion.safetensors"), drop)
    return path


def test_a_new_set_is_stored_under_the_tree_of_its_own_leaves(tmp_path):
    assert PATCH_FORMAT_VERSION >= BLAKE3_FORMAT > BLOB_TREE_FORMAT
    src = make_set().save(tmp_path / "math.safetensors")
    entry = Registry(tmp_path / "reg").publish(src)
    assert entry.digest == tree_address(src.read_bytes()) == file_digest(src)
    assert entry.digest.startswith("blake3:") and entry.digest != plain(src)
    m = ExpertSet.open(src).manifest
    assert m.content_digest.startswith("blake3:")
    assert all(d.startswith("blake3:") for d in m.expert_digests.values())


def test_format_3_files_keep_their_sha256_tree(tmp_path):
    """A set an expertlib of format 3 wrote: stored, pulled and checked under its sha256 tree, next
    to a format 4 set under its BLAKE3 tree in the same registry."""
    path = older(make_set(dtype=torch.float32), 3, tmp_path / "old.safetensors")
    assert file_digest(path) == tree_address(path.read_bytes()) != plain(path)
    reg = Registry(tmp_path / "reg")
    old = reg.publish(path)
    new = reg.publish(make_set(task="code").save(tmp_path / "code.safetensors"))
    assert old.digest.startswith("sha256:") and new.digest.startswith("blake3:")
    assert reg.verify().ok and sorted(reg.blobs.iter_digests()) == sorted([new.digest, old.digest])
    reg.open("math").verify(always=True)
    assert str(reg.resolve(f"math@{old.digest[:15]}").ref) == "math@1"
    assert str(reg.resolve(f"code@{new.digest[:15]}").ref) == "code@1"
    back = Registry(tmp_path / "back")
    back.pull(str(reg.root))
    assert {e.digest for e in back.list()} == {old.digest, new.digest} and back.verify().ok


@pytest.mark.parametrize("version", [1, 2, None])
def test_older_files_keep_the_sha256_address_and_still_verify(tmp_path, version):
    path = older(make_set(dtype=torch.float32), version, tmp_path / "old.safetensors")
    assert file_digest(path) == plain(path)
    reg = Registry(tmp_path / "reg")
    entry = reg.publish(path)
    assert entry.digest == plain(path)
    assert reg.verify().ok
    reg.open("math").verify(always=True)
    back = Registry(tmp_path / "back")
    back.pull(str(reg.root))
    assert back.resolve("math").digest == entry.digest and back.verify().ok


def test_the_tree_covers_every_byte(tmp_path):
    src = make_set().save(tmp_path / "math.safetensors")
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    want = blob_digest([data])
    # a header byte (JSON whitespace: the file still parses the same), a tensor byte, a byte appended
    head = data[8 : 8 + n]
    assert head.endswith(b" ") or b", " in head or b": " in head
    i = 8 + n - 1 if head.endswith(b" ") else 8 + head.index(b" ")
    changed = [data[:i] + b"\t" + data[i + 1 :], data[:-1] + bytes([data[-1] ^ 1]), data + b"\0"]
    for other in changed:
        assert blob_digest([other]) != want


def test_a_plain_sha256_is_no_address_of_a_tree_format_file(tmp_path):
    """No scheme confusion: bytes announced under their whole-file sha256 (what an older registry
    would call them) are refused when they are a format 3 patch, and nothing is stored."""
    src = make_set().save(tmp_path / "math.safetensors")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(DigestMismatchError):
        reg.publish(src, expected_digest=plain(src))
    assert reg.list() == [] and list(reg.blobs.tmp_dir.iterdir()) == []


def test_no_address_of_one_hash_passes_for_the_other(tmp_path):
    """The file's tree hashed with sha256 (what format 3 would call it), or the other algorithm's name
    on the right hex digits, is no address of a format 4 file: publish refuses both, stores nothing."""
    src = make_set().save(tmp_path / "math.safetensors")
    right = file_digest(src)
    data = src.read_bytes()
    assert right.startswith("blake3:") and right == tree_address(data)
    reg = Registry(tmp_path / "reg")
    for wrong in (tree_address(data, "sha256"), right.replace("blake3:", "sha256:")):
        with pytest.raises(DigestMismatchError):
            reg.publish(src, expected_digest=wrong)
    assert reg.list() == [] and list(reg.blobs.tmp_dir.iterdir()) == []
    assert reg.publish(src, expected_digest=right).digest == right


def test_a_forged_tree_is_refused_on_pull(tmp_path):
    """A remote whose blob was altered (a tensor byte) under its tree address: the pull recomputes
    the tree while copying and refuses it."""
    reg = Registry(tmp_path / "reg")
    entry = reg.publish(make_set().save(tmp_path / "math.safetensors"))
    blob = reg.blobs.path(entry.digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-3] ^= 1
    blob.write_bytes(bytes(data))
    reg.blobs.forget_record(entry.digest)
    back = Registry(tmp_path / "back")
    with pytest.raises(DigestMismatchError):
        back.pull(str(reg.root))
    assert back.list() == []


def test_the_copy_falls_back_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    src = make_set().save(tmp_path / "math.safetensors")
    first = Registry(tmp_path / "a").publish(src)

    def refuse(*a, **kw):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr("os.copy_file_range", refuse)
    reg = Registry(tmp_path / "b")
    entry = reg.publish(src)
    assert entry.digest == first.digest
    assert reg.blobs.path(entry.digest).read_bytes() == src.read_bytes()
    assert reg.verify().ok


def test_an_object_store_holds_both_addresses_where_each_expertlib_looks(tmp_path):
    """On object storage a sha256 blob stays at `blobs/<hex>` (where format 3 registries put it) and a
    BLAKE3 blob goes to `blobs/blake3/<hex>`; both come back intact."""
    import uuid

    from expertlib.registry.remotes import open_remote

    reg = Registry(tmp_path / "reg")
    old = reg.publish(older(make_set(dtype=torch.float32), 3, tmp_path / "old.safetensors"))
    new = reg.publish(make_set(task="code").save(tmp_path / "code.safetensors"))
    store = f"memory://both-{uuid.uuid4().hex}"
    reg.push("math", store)
    reg.push("code", store)
    remote = open_remote(store, source=True)
    root = store.removeprefix("memory://")
    assert remote.fs.exists(f"{root}/blobs/{old.digest.removeprefix('sha256:')}")
    assert remote.fs.exists(f"{root}/blobs/blake3/{new.digest.removeprefix('blake3:')}")
    back = Registry(tmp_path / "back")
    back.pull(store)
    assert {e.digest for e in back.list()} == {old.digest, new.digest} and back.verify().ok
