"""Verify once, trust by content, re-check on change: the paths that let loads skip hashing.

A set file is hashed in full once; afterwards a load trusts that check only while the file is the
same file in the same state (device, inode, size, mtime_ns, ctime_ns). These tests change the file
in every way a user or an attacker could and check that the change is caught.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import expertlib.verify as verify_mod
from expertlib.errors import DigestMismatchError, NonFiniteWeightsError
from expertlib.identity import BaseIdentity
from expertlib.moe import ExpertWeights
from expertlib.patch import ExpertSet, tensors_digest
from expertlib.registry import Registry
from expertlib.verify import VerifiedRecord

BASE = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny")


def make_set(
    task: str = "math", seed: int = 0, dtype=torch.bfloat16, value: float | None = None
) -> ExpertSet:
    g = torch.Generator().manual_seed(seed)
    experts = {}
    for layer, e in [(0, 1), (0, 3), (1, 2)]:
        experts[(layer, e)] = ExpertWeights(
            gate=torch.randn(16, 32, generator=g),
            up=torch.randn(16, 32, generator=g),
            down=torch.randn(32, 16, generator=g),
        )
    if value is not None:
        experts[(1, 2)].down[3, 4] = value
    return ExpertSet.build(
        task=task,
        base=BASE,
        experts=experts,
        base_digests={k: "sha256:" + "1" * 64 for k in experts},
        dtype=dtype,
    )


@pytest.fixture(autouse=True)
def fresh_memory():
    """Each test starts with a process that has checked nothing."""
    verify_mod._CHECKED.clear()
    yield
    verify_mod._CHECKED.clear()


def count_scans(monkeypatch) -> list[str]:
    """Record every full pass over a file."""
    seen: list[str] = []
    real = verify_mod.scan_file

    def counting(path, *a, **kw):
        seen.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr("expertlib.patch.scan_file", counting)
    return seen


def flip_byte_in_place(path: Path, offset_from_end: int = 3) -> None:
    """Change one tensor byte without replacing the file (same inode), as an in-place editor would."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x55]))


def later() -> None:
    """Let the clock move past the file system's timestamp granularity."""
    time.sleep(0.02)


# --- one process, a file outside the registry -----------------------------------------------------


def test_a_file_is_hashed_once_per_unchanged_state(tmp_path, monkeypatch):
    path = make_set().save(tmp_path / "math.safetensors")
    scans = count_scans(monkeypatch)
    first = ExpertSet.open(path).verify()
    again = ExpertSet.open(path).verify()
    assert first == again and len(scans) == 1  # the second load trusted the first check
    ExpertSet.open(path).verify(always=True)  # --verify-loads always
    assert len(scans) == 2


def test_bytes_changed_in_place_are_refused(tmp_path, monkeypatch):
    path = make_set().save(tmp_path / "math.safetensors")
    ExpertSet.open(path).verify()
    later()
    flip_byte_in_place(path)
    with pytest.raises(DigestMismatchError, match="altered or damaged"):
        ExpertSet.open(path).verify()


def test_bytes_changed_with_mtime_set_back_are_refused(tmp_path):
    path = make_set().save(tmp_path / "math.safetensors")
    st = path.stat()
    ExpertSet.open(path).verify()
    later()
    flip_byte_in_place(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime back; ctime cannot be set back
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(DigestMismatchError):
        ExpertSet.open(path).verify()


def test_another_file_renamed_into_place_is_checked(tmp_path):
    """A verified file replaced by another one under the same name (a new inode) is never trusted,
    even when the newcomer claims the same content digest in its manifest."""
    path = make_set().save(tmp_path / "math.safetensors")
    good = ExpertSet.open(path)
    good.verify()
    other = make_set(seed=1)
    claims = other.manifest.model_copy(
        update={
            "content_digest": good.manifest.content_digest,
            "expert_digests": good.manifest.expert_digests,
        }
    )
    ExpertSet(claims, dict(other.tensors)).save(tmp_path / "swap")
    os.replace(tmp_path / "swap", path)
    with pytest.raises(DigestMismatchError):
        ExpertSet.open(path).verify()


def test_a_record_never_vouches_for_another_file(tmp_path):
    """A record of one file handed to another file (a copy with equal bytes included) is not used."""
    a = make_set().save(tmp_path / "a.safetensors")
    es = ExpertSet.open(a)
    es.verify()
    record = es.checked
    assert record is not None and record.matches(a, es.manifest.content_digest)
    b = tmp_path / "b.safetensors"
    b.write_bytes(a.read_bytes())
    assert not record.matches(b, es.manifest.content_digest)
    bad = make_set(value=float("nan"))
    c = bad.save(tmp_path / "c.safetensors")
    poisoned = ExpertSet.open(c).trust(record.model_copy(update={"path": str(c.resolve())}))
    with pytest.raises(NonFiniteWeightsError):
        poisoned.verify()


# --- what one pass finds -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_refused_from_file_and_memory(tmp_path, value):
    bad = make_set(value=value)
    with pytest.raises(NonFiniteWeightsError):
        bad.verify()
    path = bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(NonFiniteWeightsError):
        ExpertSet.open(path).verify()


def test_scan_reports_max_abs_per_tensor(tmp_path):
    es = make_set(dtype=torch.float32)
    path = es.save(tmp_path / "m.safetensors")
    opened = ExpertSet.open(path)
    opened.verify()
    for name, t in es.tensors.items():
        assert opened.scan.absmax[name] == pytest.approx(float(t.abs().max()))


def test_format_1_patches_still_open(tmp_path):
    """A patch written before the tree digests (format 1: flat content digest, float32 expert
    digests) verifies, and a changed byte in it is still refused."""
    es = make_set(dtype=torch.float32)
    old = es.manifest.model_copy(
        update={
            "format_version": 1,
            "content_digest": tensors_digest(es.tensors),
            "expert_digests": {f"{layer}.{e}": w.digest() for (layer, e), w in es.experts()},
        }
    )
    path = ExpertSet(old, dict(es.tensors)).save(tmp_path / "v1.safetensors")
    opened = ExpertSet.open(path)
    assert opened.manifest.format_version == 1
    assert opened.verify() == old.expert_digests
    later()
    flip_byte_in_place(path)
    with pytest.raises(DigestMismatchError):
        ExpertSet.open(path).verify()


# --- the registry's records ----------------------------------------------------------------------------


def test_registry_blob_verified_at_ingest_is_not_hashed_again(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg")
    src = make_set().save(tmp_path / "math.safetensors")
    reg.publish(src)
    verify_mod._CHECKED.clear()  # a new process (the server) knows only the registry's record
    scans = count_scans(monkeypatch)
    monkeypatch.setattr(
        "expertlib.registry.upkeep.stream_file", lambda p: pytest.fail("a recorded blob was hashed")
    )
    es = reg.open("math")
    es.verify()
    assert scans == []
    assert es.scan is not None and es.scan.finite


@pytest.mark.parametrize("set_mtime_back", [False, True])
def test_registry_blob_altered_after_ingest_is_refused(tmp_path, set_mtime_back):
    reg = Registry(tmp_path / "reg")
    entry = reg.publish(make_set().save(tmp_path / "math.safetensors"))
    blob = reg.blobs.path(entry.digest)
    st = blob.stat()
    verify_mod._CHECKED.clear()
    later()
    flip_byte_in_place(blob)
    if set_mtime_back:
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DigestMismatchError):
        reg.open("math")
    stale = VerifiedRecord.model_validate_json(reg.blobs.record_path(entry.digest).read_bytes())
    with pytest.raises(DigestMismatchError):  # the ingest record does not vouch for the changed blob
        reg.open("math", verify=False).trust(stale).verify()


# --- publish, push and pull: one pass over the bytes -----------------------------------------------------


def no_second_read(monkeypatch) -> None:
    """Fail on any read of a set file beyond the copy that hashes it on the way."""
    monkeypatch.setattr("expertlib.patch.scan_file", lambda *a, **kw: pytest.fail("a file was read twice"))
    monkeypatch.setattr(
        "expertlib.registry.upkeep.stream_file", lambda p: pytest.fail("a blob was hashed again")
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [1, 5, 4096, 1 << 22])
def test_stream_scan_equals_a_full_scan(dtype, chunk):
    """The scan made while bytes stream past (chunks cut anywhere, mid-element included) equals the
    scan of the same file read whole: digests and every tensor's max |w|, NaN included."""
    import math

    from expertlib.verify import StreamScan, scan_tensors

    for value in (None, float("nan"), float("-inf"), -7.5):
        es = make_set(dtype=dtype, value=value)
        data = _file_bytes(es)
        stream = StreamScan()
        for i in range(0, len(data), chunk):
            stream.update(data[i : i + chunk])
        got, want = stream.scan(es.manifest), scan_tensors(es.tensors, es.manifest)
        assert stream.digest() == tree_address(data)  # however the bytes were cut
        assert (got.content_digest, got.expert_digests) == (want.content_digest, want.expert_digests)
        for name, v in want.absmax.items():
            assert got.absmax[name] == v or (math.isnan(v) and math.isnan(got.absmax[name]))


def tree_address(data: bytes, algorithm: str | None = None) -> str:
    """A format-3 or later blob's address, computed from the file format's description alone (the
    lines of `expertlib.verify.blob_digest`): the header's hash and each tensor's, by position, with
    BLAKE3 from format 4 and sha256 before (`algorithm`: that one instead)."""
    import hashlib
    import json
    import struct

    import blake3

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    fmt = json.loads(header.pop("__metadata__")["expertlib.manifest"])["format_version"]
    label = algorithm or ("blake3" if fmt >= 4 else "sha256")
    new = blake3.blake3 if label == "blake3" else hashlib.sha256
    lines = [
        b"expertlib blob tree 1\n",
        f"header|0|{8 + n}|{new(data[: 8 + n]).hexdigest()}\n".encode(),
    ]
    at = 8 + n
    for a, b in sorted(tuple(info["data_offsets"]) for info in header.values()):
        a, b = a + 8 + n, b + 8 + n
        assert a == at  # safetensors writes tensors back to back
        lines.append(f"tensor|{a}|{b}|{new(data[a:b]).hexdigest()}\n".encode())
        at = b
    assert at == len(data)
    return f"{label}:{new(b''.join(lines)).hexdigest()}"


def _file_bytes(es: ExpertSet) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return es.save(Path(d) / "x.safetensors").read_bytes()


def test_publish_hashes_while_copying_and_loads_trust_it(tmp_path, monkeypatch):
    """Publish reads the file once (copy, blob digest and the patch's own digests in one pass) and
    keeps a record that loads trust; the scan it keeps is the one a full read finds."""
    src = make_set().save(tmp_path / "math.safetensors")
    full = ExpertSet.open(src)
    full.verify(always=True)
    verify_mod._CHECKED.clear()
    no_second_read(monkeypatch)
    reg = Registry(tmp_path / "reg")
    entry = reg.publish(src)
    es = reg.open("math")
    es.verify()
    assert es.scan == full.scan
    assert reg.blobs.record(entry.digest, entry.content_digest) is not None


@pytest.mark.parametrize("problem", ["nan", "forged"])
def test_publish_still_refuses_bad_sets(tmp_path, problem):
    """The one-pass check keeps every guarantee: NaN/inf and forged expert digests are refused."""
    if problem == "nan":
        path = make_set(value=float("nan")).save(tmp_path / "bad.safetensors")
        err = NonFiniteWeightsError
    else:
        good, other = make_set(), make_set(seed=1)
        forged = other.manifest.model_copy(update={"expert_digests": good.manifest.expert_digests})
        path = ExpertSet(forged, dict(other.tensors)).save(tmp_path / "bad.safetensors")
        err = DigestMismatchError
    reg = Registry(tmp_path / "reg")
    with pytest.raises(err):
        reg.publish(path)
    assert reg.list() == [] and list(reg.blobs.iter_digests()) == []


def test_folder_pull_reads_each_blob_once(tmp_path, monkeypatch):
    """A pull from a folder whose blobs are unchanged since their check copies each one in one
    hashing pass: no separate check of the source, no second read of the copy."""
    src = Registry(tmp_path / "src")
    src.publish(make_set().save(tmp_path / "math.safetensors"))
    verify_mod._CHECKED.clear()
    no_second_read(monkeypatch)
    dst = Registry(tmp_path / "dst")
    assert dst.pull(str(tmp_path / "src")).copied == ["math@1"]
    e = dst.resolve("math")
    assert dst.blobs.record(e.digest, e.content_digest) is not None


# --- HTTP pulls resume where they broke ------------------------------------------------------------------


def _flaky_remote(data: bytes, *, break_at: list[int], ranges: bool = True):
    """An HttpRemote over a transport that serves `data` and drops the connection after each offset
    in `break_at` (one per request), answering Range requests with 206 when `ranges`."""
    import httpx

    from expertlib.registry.client import HttpRemote

    seen: list[str | None] = []

    class Broken(httpx.SyncByteStream):
        def __init__(self, body: bytes, cut: int | None):
            self.body, self.cut = body, cut

        def __iter__(self):
            if self.cut is None:
                yield self.body
                return
            yield self.body[: self.cut]
            raise httpx.ReadError("connection reset by peer")

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        seen.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and ranges else 0
        cut = break_at.pop(0) - start if break_at else None
        body = data[start:]
        if rng and ranges:
            headers = {"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            return httpx.Response(206, headers=headers, stream=Broken(body, cut))
        return httpx.Response(200, stream=Broken(body, cut))

    client = httpx.Client(base_url="http://remote/reg", transport=httpx.MockTransport(handler))
    return HttpRemote("http://remote/reg", client=client), seen


def test_http_pull_resumes_a_broken_download(tmp_path):
    reg = Registry(tmp_path / "src")
    entry = reg.publish(make_set().save(tmp_path / "math.safetensors"))
    data = reg.blobs.path(entry.digest).read_bytes()
    remote, seen = _flaky_remote(data, break_at=[len(data) // 3, 2 * len(data) // 3])
    dst = Registry(tmp_path / "dst")
    tmp, _ = remote.fetch(entry, dst.blobs)
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    assert seen == [None, f"bytes={len(data) // 3}-", f"bytes={2 * len(data) // 3}-"]
    got = dst.publish(tmp.path, staged=tmp, expected_digest=entry.digest)
    assert got.digest == entry.digest


def test_http_pull_without_range_support_fails_cleanly(tmp_path):
    from expertlib.errors import RemoteError

    reg = Registry(tmp_path / "src")
    entry = reg.publish(make_set().save(tmp_path / "math.safetensors"))
    data = reg.blobs.path(entry.digest).read_bytes()
    remote, _ = _flaky_remote(data, break_at=[len(data) // 2], ranges=False)
    dst = Registry(tmp_path / "dst")
    with pytest.raises(RemoteError, match="cannot resume"):
        remote.fetch(entry, dst.blobs)
    assert list(dst.blobs.tmp_dir.iterdir()) == []  # nothing half-written stays behind


# --- reading a set into host memory: read and hashed in one overlapped pass -----------------------------


@pytest.mark.parametrize("fmt", [1, 3])
def test_read_verified_returns_the_checked_bytes_once(tmp_path, monkeypatch, fmt):
    es = make_set(dtype=torch.float32)
    if fmt == 1:
        old = es.manifest.model_copy(
            update={
                "format_version": 1,
                "content_digest": tensors_digest(es.tensors),
                "expert_digests": {f"{layer}.{e}": w.digest() for (layer, e), w in es.experts()},
            }
        )
        es = ExpertSet(old, dict(es.tensors))
    path = es.save(tmp_path / "math.safetensors")
    loaded = ExpertSet.open(path).read_verified()
    assert loaded.scan is not None and loaded.checked is not None
    for name, t in es.tensors.items():
        assert torch.equal(loaded.tensors[name], t)
    # the same file, unchanged: the check made by that read stands, nothing is hashed again
    monkeypatch.setattr(verify_mod, "_leaf", lambda *a: pytest.fail("hashed again"))
    monkeypatch.setattr("expertlib.patch.read_scanned", lambda *a: pytest.fail("hashed again"))
    again = ExpertSet.open(path).read_verified()
    assert again.scan == loaded.scan


def test_read_verified_refuses_what_verify_refuses(tmp_path):
    path = make_set().save(tmp_path / "math.safetensors")
    flip_byte_in_place(path)
    with pytest.raises(DigestMismatchError):
        ExpertSet.open(path).read_verified()
    nan = make_set(task="nan", value=float("nan")).save(tmp_path / "nan.safetensors")
    with pytest.raises(NonFiniteWeightsError):
        ExpertSet.open(nan).read_verified()


@pytest.mark.parametrize("set_mtime_back", [False, True])
def test_read_verified_rechecks_a_file_changed_after_its_check(tmp_path, set_mtime_back):
    path = make_set().save(tmp_path / "math.safetensors")
    ExpertSet.open(path).read_verified()
    st = path.stat()
    later()
    flip_byte_in_place(path)
    if set_mtime_back:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DigestMismatchError):
        ExpertSet.open(path).read_verified()
