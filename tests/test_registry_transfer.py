"""Moving a set between registries at file-copy speed: downloads read the socket in big pieces and
resume where they broke, copies into the store are written to disk while they are hashed, the TLS
roots are loaded once per process. The hardening of every path stays: short, long and unresumable
downloads are refused and nothing half-written stays behind."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time

import pytest
import torch
from test_registry_remotes import http_remote  # noqa: F401 - the fixture

import expertlib.registry.blobs as blobs_mod
import expertlib.registry.client as client_mod
from expertlib.errors import DigestMismatchError, NotFoundError, RemoteError
from expertlib.identity import BaseIdentity
from expertlib.moe import ExpertWeights
from expertlib.patch import ExpertSet
from expertlib.registry import Registry
from expertlib.registry.client import HttpRemote

BASE = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny")


def wide_set() -> ExpertSet:
    """A set of 576 KiB: many of httpx's 64 KiB reads, one of the socket path's."""
    g = torch.Generator().manual_seed(0)
    experts = {
        (0, e): ExpertWeights(
            gate=torch.randn(64, 512, generator=g),
            up=torch.randn(64, 512, generator=g),
            down=torch.randn(512, 64, generator=g),
        )
        for e in range(3)
    }
    return ExpertSet.build(
        task="wide", base=BASE, experts=experts, base_digests={k: "sha256:" + "1" * 64 for k in experts}
    )


# --- HTTP downloads ------------------------------------------------------------------------------------


def test_http_pull_reads_the_socket_in_big_pieces(http_remote, tmp_path):  # noqa: F811
    """A pull from a registry server reads its download in pieces far above httpx's 64 KiB (what
    bounded loopback pulls), and the set arrives intact."""
    served, url = http_remote
    entry = served.publish(wide_set().save(tmp_path / "wide.safetensors"))
    remote = HttpRemote(url)
    pieces: list[int] = []
    remote.on_bytes = pieces.append
    dst = Registry(tmp_path / "dst")
    tmp, _ = remote.fetch(entry, dst.blobs)
    assert tmp.digest == entry.digest and sum(pieces) == entry.size
    assert max(pieces) > 64 * 1024
    got = dst.publish(tmp.path, staged=tmp, expected_digest=entry.digest)
    assert dst.open(got.ref).verify()


class _Blob(http.server.BaseHTTPRequestHandler):
    """Serves the server's `data`, cutting the connection after each offset of `break_at` (one per
    request), answering Range requests when `ranges`, sending `extra` bytes past the announced size."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.seen.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and srv.ranges else 0
        cut = srv.break_at.pop(0) - start if srv.break_at else None
        body = srv.data[start:]
        self.send_response(206 if rng and srv.ranges else 200)
        if rng and srv.ranges:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.data) - 1}/{len(srv.data)}")
        self.send_header("Content-Length", str(len(body) + srv.extra))
        self.end_headers()
        self.wfile.write(body[:cut] if cut is not None else body + b"\0" * srv.extra)
        if cut is not None and srv.stall:
            self.wfile.flush()
            time.sleep(srv.stall)  # the connection stays open, silent
        self.close_connection = cut is not None

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def blob_server(data: bytes, *, break_at=(), ranges: bool = True, extra: int = 0, stall: float = 0.0):
    """A plain HTTP server on 127.0.0.1 serving `data` at every path; yields (url, Range headers seen).
    `stall`: at each offset of `break_at`, fall silent that long before closing the connection."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    srv.data, srv.break_at, srv.ranges, srv.extra, srv.seen = data, list(break_at), ranges, extra, []
    srv.stall = stall
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/reg", srv.seen
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def published(tmp_path):
    reg = Registry(tmp_path / "src")
    entry = reg.publish(wide_set().save(tmp_path / "wide.safetensors"))
    return entry, reg.blobs.path(entry.digest).read_bytes()


def test_socket_download_resumes_where_it_broke(published, tmp_path):
    entry, data = published
    cuts = [len(data) // 3, 2 * len(data) // 3]
    with blob_server(data, break_at=cuts) as (url, seen):
        remote = HttpRemote(url)
        assert remote.direct
        dst = Registry(tmp_path / "dst")
        tmp, _ = remote.fetch(entry, dst.blobs)
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    assert seen == [None, f"bytes={cuts[0]}-", f"bytes={cuts[1]}-"]


def test_socket_download_without_range_support_fails_cleanly(published, tmp_path):
    entry, data = published
    with blob_server(data, break_at=[len(data) // 2], ranges=False) as (url, _):
        dst = Registry(tmp_path / "dst")
        with pytest.raises(RemoteError, match="cannot resume"):
            HttpRemote(url).fetch(entry, dst.blobs)
    assert list(dst.blobs.tmp_dir.iterdir()) == []  # nothing half-written stays behind


def test_socket_download_longer_than_announced_is_refused(published, tmp_path):
    entry, data = published
    with blob_server(data, extra=1) as (url, _):
        dst = Registry(tmp_path / "dst")
        with pytest.raises(RemoteError, match="more than the"):
            HttpRemote(url).fetch(entry, dst.blobs)
    assert list(dst.blobs.tmp_dir.iterdir()) == []


def test_socket_download_that_never_completes_gives_up(published, tmp_path):
    """A remote that breaks every time: RESUME_TRIES resumes, then a clear error, nothing kept."""
    entry, data = published
    step = len(data) // 10
    with blob_server(data, break_at=[step * (i + 1) for i in range(9)]) as (url, seen):
        dst = Registry(tmp_path / "dst")
        with pytest.raises(RemoteError, match="failed 6 times"):
            HttpRemote(url).fetch(entry, dst.blobs)
    assert len(seen) == 1 + client_mod.RESUME_TRIES
    assert list(dst.blobs.tmp_dir.iterdir()) == []


def test_socket_download_error_answer_names_the_remote(http_remote, tmp_path):  # noqa: F811
    """An error status is the remote's answer, not a break: no retry, its message in the error."""
    served, url = http_remote
    entry = served.publish(wide_set().save(tmp_path / "wide.safetensors"))
    served.rm(str(entry.ref))
    dst = Registry(tmp_path / "dst")
    with pytest.raises(NotFoundError, match="no published expert set has digest"):
        HttpRemote(url).fetch(entry, dst.blobs)
    assert list(dst.blobs.tmp_dir.iterdir()) == []


def test_downloads_use_httpx_behind_a_proxy_or_a_given_client(monkeypatch):
    """The socket path goes straight to the host: with a proxy in the environment (and the host not
    exempted), a client handed in or a password in the URL, downloads go through httpx as every
    other request does."""
    import httpx

    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert HttpRemote("http://registry:8000/reg").direct
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not HttpRemote("http://registry:8000/reg").direct
    monkeypatch.setenv("NO_PROXY", "registry")
    assert HttpRemote("http://registry:8000/reg").direct
    assert not HttpRemote("http://registry:8000/reg", client=httpx.Client()).direct
    assert not HttpRemote("http://me:secret@registry:8000/reg").direct  # httpx sends the password


def test_tls_roots_are_loaded_once_per_process(monkeypatch):
    """Every client used to load certifi's roots anew (0.05-0.15 s per pull, plain HTTP included)."""
    import certifi

    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    loads: list[str] = []
    real = certifi.where
    monkeypatch.setattr(certifi, "where", lambda: loads.append("roots") or real())
    client_mod._tls_for.cache_clear()
    HttpRemote("http://a/reg")
    HttpRemote("https://b/reg")
    assert loads == ["roots"]


# --- copies into the store ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "stream"])
def test_copies_into_the_store_are_written_back_while_hashed(source, tmp_path, monkeypatch):
    """Every piece of a copy into the store is handed to the disk as soon as it landed (so the fsync
    before the blob enters has little left to write): the ranges cover the file once, in order."""
    ranges: list[tuple[int, int]] = []
    real = blobs_mod.start_writeback
    monkeypatch.setattr(
        blobs_mod, "start_writeback", lambda fd, a, n: ranges.append((a, n)) or real(fd, a, n)
    )
    monkeypatch.setattr(blobs_mod, "KERNEL_CHUNK", 64 * 1024)  # several pieces for a small file
    path = wide_set().save(tmp_path / "wide.safetensors")
    data = path.read_bytes()
    src = path if source == "file" else iter([data[i : i + 10_000] for i in range(0, len(data), 10_000)])
    tmp = blobs_mod.BlobStore(tmp_path / "reg").write_temp(src)
    assert tmp.path.read_bytes() == data
    assert len(ranges) > 2 and ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
    assert sum(n for _, n in ranges) == len(data)


def test_writeback_runs_beside_the_copy_and_ends_before_the_file_closes(tmp_path, monkeypatch):
    """The disk's queue makes each writeback call wait (0.06 s per 144 MiB, measured), so the calls
    run on a thread of their own, not on the thread that copies; every call is made before the temp
    file is closed (none may reach a descriptor that was closed and reused)."""
    calls: list[tuple[str, int]] = []
    real = blobs_mod.start_writeback

    def writeback(fd, a, n):
        calls.append((threading.current_thread().name, fd))
        os.fstat(fd)  # still this file's descriptor: open
        real(fd, a, n)

    monkeypatch.setattr(blobs_mod, "start_writeback", writeback)
    monkeypatch.setattr(blobs_mod, "KERNEL_CHUNK", 64 * 1024)
    path = wide_set().save(tmp_path / "wide.safetensors")
    tmp = blobs_mod.BlobStore(tmp_path / "reg").write_temp(path)
    assert tmp.path.read_bytes() == path.read_bytes()
    assert len(calls) > 2
    assert all(name.startswith("expertlib-writeback") for name, _ in calls)
    assert threading.main_thread().name not in {name for name, _ in calls}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_stream_max_abs_is_the_largest_magnitude_whatever_the_signs(dtype):
    """max |w| of streamed bytes (two in-place reductions, no masked copy) equals torch's, for
    tensors all negative, all positive, mixed, all -0.0, and with NaN of either sign or inf."""
    import math

    from expertlib.verify import _bits_value, _peak_bits

    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, generator=g, dtype=torch.float64) * 10
    cases = [x, x.abs(), -x.abs(), torch.full((5,), -0.0), torch.tensor([-3.0, 2.0, -0.5]), x[:1]]
    for t in cases:
        t = t.to(dtype)
        got = _bits_value(_peak_bits(t.view(torch.uint8).numpy().tobytes(), dtype), dtype)
        assert got == float(t.abs().max()), (t, got)
    for special in (float("inf"), float("-inf"), float("nan")):
        t = (-x.abs()).to(dtype)
        t[7] = special
        got = _bits_value(_peak_bits(t.view(torch.uint8).numpy().tobytes(), dtype), dtype)
        assert got == math.inf if math.isinf(special) else math.isnan(got)
    t = x.to(dtype)
    t.view(ints)[3] = -1  # every bit set: a NaN with the sign bit
    assert math.isnan(_bits_value(_peak_bits(t.view(torch.uint8).numpy().tobytes(), dtype), dtype))


# --- downloads spliced from the socket into the file ----------------------------------------------------


@pytest.fixture
def splices(monkeypatch):
    """The bytes each os.splice call moved (the socket path splices where the platform can)."""
    if not hasattr(os, "splice"):
        pytest.skip("no os.splice on this platform")
    moved: list[int] = []
    real = os.splice

    def counting(*args, **kw):
        n = real(*args, **kw)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved


def test_http_download_is_spliced_into_the_file(published, tmp_path, splices):
    """Over plain HTTP the body moves socket -> pipe -> temp file inside the kernel (no copy through
    the process), and the bytes stored are hashed as before."""
    entry, data = published
    with blob_server(data) as (url, _):
        pieces: list[int] = []
        remote = HttpRemote(url)
        remote.on_bytes = pieces.append
        tmp, _ = remote.fetch(entry, Registry(tmp_path / "dst").blobs)
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    assert sum(pieces) == len(data)
    assert sum(splices) >= 2 * (len(data) - 64 * 1024)  # into the pipe and out: all but a read-ahead


def test_spliced_download_resumes_where_it_broke(published, tmp_path, splices):
    entry, data = published
    cuts = [len(data) // 3, 2 * len(data) // 3]
    with blob_server(data, break_at=cuts) as (url, seen):
        tmp, _ = HttpRemote(url).fetch(entry, Registry(tmp_path / "dst").blobs)
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    assert seen == [None, f"bytes={cuts[0]}-", f"bytes={cuts[1]}-"]
    assert splices


def test_spliced_download_that_stalls_times_out_and_resumes(published, tmp_path, splices):
    """The socket waits under the client's timeout (it is non-blocking then): a silent server is a
    break like a closed connection, resumed from the bytes already written."""
    entry, data = published
    cut = len(data) // 2
    with blob_server(data, break_at=[cut], stall=5.0) as (url, seen):
        t = time.perf_counter()
        tmp, _ = HttpRemote(url, timeout=0.5).fetch(entry, Registry(tmp_path / "dst").blobs)
        assert time.perf_counter() - t < 4.0
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    assert seen == [None, f"bytes={cut}-"]


def test_spliced_download_with_a_changed_byte_is_refused(published, tmp_path, splices):
    """The hash is of the bytes that landed in the file: one byte changed on the wire is caught,
    and nothing stays behind."""
    entry, data = published
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    dst = Registry(tmp_path / "dst")
    with blob_server(bytes(bad)) as (url, _), pytest.raises(DigestMismatchError):
        HttpRemote(url).fetch(entry, dst.blobs)
    assert splices and list(dst.blobs.tmp_dir.iterdir()) == []


def test_spliced_download_longer_than_announced_stops_at_one_byte_more(published, tmp_path, splices):
    """A body longer than the entry's size is refused after at most one byte past it, not written
    out to its end."""
    entry, data = published
    dst = Registry(tmp_path / "dst")
    with blob_server(data, extra=10 << 20) as (url, _), pytest.raises(RemoteError, match="more than the"):
        HttpRemote(url).fetch(entry, dst.blobs)
    assert 0 < sum(splices) <= 2 * (len(data) + 1)
    assert list(dst.blobs.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("how", ["no splice", "refused"])
def test_download_falls_back_to_reading_where_splice_is_missing(published, tmp_path, monkeypatch, how):
    """Without os.splice (not Linux), or where the kernel refuses it for these descriptors, the body
    is read into the process and written as before."""
    import errno

    entry, data = published
    if how == "no splice":
        monkeypatch.delattr(os, "splice", raising=False)
    else:
        calls: list[int] = []

        def refuse(*args, **kw):
            calls.append(1)
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(os, "splice", refuse)
    with blob_server(data) as (url, _):
        tmp, _ = HttpRemote(url).fetch(entry, Registry(tmp_path / "dst").blobs)
    assert tmp.digest == entry.digest and tmp.path.read_bytes() == data
    if how == "refused":
        assert calls == [1]


def test_a_blob_in_a_new_folder_syncs_the_folder_and_its_parent_at_once(tmp_path, monkeypatch):
    """A blob whose two-hex folder is new needs that folder and its parent on disk before the index
    may name it; the two fsyncs each wait for the disk, so they run at the same time (5.0 -> 0.6 ms)."""
    synced: list = []
    both = threading.Barrier(2, timeout=5)

    def fsync_dir(path):
        synced.append(path)
        both.wait()  # returns only once the other fsync runs too

    monkeypatch.setattr(blobs_mod, "fsync_dir", fsync_dir)
    store = blobs_mod.BlobStore(tmp_path / "reg")
    target = store.commit(store.write_temp(wide_set().save(tmp_path / "wide.safetensors")))
    assert sorted(synced) == sorted([target.parent, target.parent.parent])
    assert target.is_file()
