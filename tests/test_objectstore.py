"""Registry remotes on object storage through fsspec: fsspec's memory:// and file://, and s3:// against
moto's S3-compatible server (an emulator from PyPI) started on 127.0.0.1. Push and pull keep
digests, versions and tags; a tampered blob is refused with nothing imported; a missing set is a
clear not-found.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from server_process import free_port
from test_registry_remotes import BASE, refs_digests, src  # noqa: F401 - the fixture

from expertlib.errors import DigestMismatchError, NotFoundError
from expertlib.registry import Registry
from expertlib.registry.remotes import open_remote


@pytest.fixture(scope="module")
def s3_url():
    """A bucket on moto's S3 server, on a free local port; s3fs pointed at it through the environment."""
    pytest.importorskip("s3fs")
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed")
    import boto3

    # its own process: moto's server is a Flask app, and Flask's context proxies in this process's
    # modules make torch/vLLM's module walks in later tests fail ("Working outside of application context")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=2)
            break
        except httpx.TransportError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,  # read by botocore (and so by s3fs)
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import s3fs

    # fsspec caches filesystems by their options, not the environment: a module that ran before holds
    # one pointed at its own (stopped) server
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sets")
    try:
        yield "s3://sets/registry"
    finally:
        mp.undo()
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(params=["memory", "file", "s3"])
def store(request, tmp_path):
    if request.param == "memory":
        return f"memory://reg-{uuid.uuid4().hex}"
    if request.param == "file":
        return (tmp_path / "bucket").as_uri()
    return request.getfixturevalue("s3_url") + "-" + uuid.uuid4().hex[:8]


def test_push_and_pull_back_keep_digests_versions_tags(src, store, tmp_path):  # noqa: F811
    r = src.push("math", store)
    assert r.copied == ["math@1", "math@3"] and r.tags == ["math@stable"]
    assert src.push("math", store).present == ["math@1", "math@3"]
    src.push("code@1", store)
    remote = open_remote(store, source=True)
    assert [str(e.ref) for e in remote.entries(None, None)] == ["code@1", "math@1", "math@3"]
    back = Registry(tmp_path / "back")
    r = back.pull(store)
    assert sorted(r.copied) == ["code@1", "math@1", "math@3"]
    assert refs_digests(back) == refs_digests(src)
    assert back.verify().ok
    assert back.pull(store, ["math@stable"]).present == ["math@1"]
    assert Registry(tmp_path / "latest").pull(store, ["math@latest"]).copied == ["math@3"]


def test_a_tampered_blob_is_refused_and_a_missing_set_is_not_found(src, store, tmp_path):  # noqa: F811
    src.push("math@1", store)
    remote = open_remote(store, source=True)
    entry = remote.entries(None, None)[0]
    blob = remote._blob(entry.digest)
    data = bytearray(remote.fs.cat_file(blob))
    data[-3] ^= 0xFF
    remote.fs.pipe_file(blob, bytes(data))
    dest = Registry(tmp_path / "dest")
    with pytest.raises(DigestMismatchError):
        dest.pull(store, ["math@1"])
    assert dest.list() == [] and list(dest.blobs.iter_digests()) == []
    with pytest.raises(NotFoundError, match="nosuch"):
        dest.pull(store, ["nosuch"])
