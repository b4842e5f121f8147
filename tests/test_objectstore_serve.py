"""`serve --pull-from REMOTE`: a request for a set the server's registry does not hold pulls it from the
remote (fsspec's memory://, and s3:// on moto's S3 server in its own process) and is answered; a set the
remote does not hold either is a 404 naming the remote; a remote out of reach is a 502, and bytes that
fail their digest are refused with nothing imported. The server runs on the engine double (the HTTP
layer, the catalog and the registry are the real ones).
"""

from __future__ import annotations

import contextlib
import uuid

import httpx
import pytest
from server_process import free_port
from test_objectstore import s3_url  # noqa: F401 - the fixture
from test_server_http import FakeEngine, ServerThread

from expertlib.registry import Registry
from expertlib.registry.pullthrough import PullThrough
from expertlib.server import ServerSettings, create_app


def _patch_file(path, task: str, value: float = 0.0):
    """A real (tiny) expert-set patch file whose weights are `value` (another value: another digest)."""
    import torch

    from expertlib.identity import BaseIdentity
    from expertlib.moe import ExpertWeights
    from expertlib.patch import ExpertSet

    w = ExpertWeights(gate=torch.full((2, 4), value), up=torch.zeros(2, 4), down=torch.zeros(4, 2))
    base = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny-base")
    es = ExpertSet.build(
        task=task, base=base, experts={(0, 1): w}, base_digests={(0, 1): "sha256:" + "1" * 64}
    )
    return es.save(path)


@pytest.fixture(params=["memory", "s3"])
def remote(request, tmp_path):
    """A remote holding math@1, math@2 (math@1 tagged stable) and code@1, pushed from a registry folder."""
    url = (
        f"memory://sets-{uuid.uuid4().hex}"
        if request.param == "memory"
        else request.getfixturevalue("s3_url") + "-" + uuid.uuid4().hex[:8]
    )
    src = Registry(tmp_path / "src")
    src.publish(_patch_file(tmp_path / "m1.safetensors", "math"), tags=["stable"])
    src.publish(_patch_file(tmp_path / "m2.safetensors", "math", 0.5))
    src.publish(_patch_file(tmp_path / "c1.safetensors", "code"))
    src.push("math", url)
    src.push("code", url)
    return url


@contextlib.contextmanager
def serving(tmp_path, pull_from: str, **settings):
    """The server on the engine double, ready, while the block runs: yields (its URL, its state)."""
    engine = FakeEngine()
    app = create_app(
        ServerSettings(base="tiny-base", registry=str(tmp_path / "local"), pull_from=pull_from, **settings),
        engine_factory=lambda _s: engine,
    )
    with ServerThread(app) as server:
        server.wait_ready()
        yield server.url, app.state.server


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=60
    )


def test_a_set_the_registry_lacks_is_pulled_from_the_remote_and_served(tmp_path, remote):
    with serving(tmp_path, remote) as (url, state):
        assert Registry(tmp_path / "local").list() == []
        r = complete(url, "math@stable")  # a tag the local registry lacks
        assert r.status_code == 200, r.text
        assert state.engine.sets.keys() == {"math@1"}
        r = complete(url, "math")  # the local registry's latest: math@1 (local first)
        assert r.status_code == 200 and state.engine.sets.keys() == {"math@1"}, r.text
        r = complete(url, "math@2")  # a version the local registry lacks
        assert r.status_code == 200, r.text
        assert state.engine.sets.keys() == {"math@1", "math@2"}
        local = Registry(tmp_path / "local")
        assert sorted(str(e.ref) for e in local.list()) == ["math@1", "math@2"]
        assert local.resolve("math@stable").version == 1
        assert local.verify().ok
        assert state.registry.pulls == 2
        assert complete(url, "math@2").status_code == 200 and state.registry.pulls == 2  # now local

        missing = complete(url, "nosuch")
        assert missing.status_code == 404, missing.text
        assert remote in missing.json()["error"]["message"]
        assert complete(url, "math@7").status_code == 404  # a version the remote lacks
        assert sorted(str(e.ref) for e in local.list()) == ["math@1", "math@2"]


def test_an_older_version_pulled_after_a_newer_one_resolves_to_its_bytes(tmp_path, remote):
    """The local registry never reuses a version number: remote math@1 pulled after math@2 is stored
    as math@3; `math@1` keeps naming those bytes, and is not pulled again."""
    puller = PullThrough(Registry(tmp_path / "local"), remote)
    assert puller.resolve("math").version == 2
    on_remote = {e.version: e.digest for e in puller.source.entries(None, None) if e.name == "math"}
    first = puller.resolve("math@1")
    assert first.digest == on_remote[1] and first.version == 3
    again = puller.resolve("math@1")
    assert again.digest == on_remote[1] and puller.pulls == 2


def test_pinned_set_named_at_start_is_pulled_and_stays(tmp_path, remote):
    with serving(tmp_path, remote, pins=["code"]) as (_, state):
        assert state.engine.sets == {"code@1": True}  # resident and pinned
        assert [str(e.ref) for e in Registry(tmp_path / "local").list()] == ["code@1"]


def test_a_remote_out_of_reach_is_502_and_bad_bytes_import_nothing(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/admin/registry"  # nothing listens there
    with serving(tmp_path / "a", down) as (url, _):
        r = complete(url, "math")
        assert r.status_code == 502, r.text
        assert "cannot reach" in r.json()["error"]["message"]

    store = f"memory://bad-{uuid.uuid4().hex}"
    src = Registry(tmp_path / "src")
    src.publish(_patch_file(tmp_path / "m1.safetensors", "math"))
    src.push("math", store)
    puller = PullThrough(Registry(tmp_path / "probe"), store)
    entry = puller.source.entries(None, None)[0]
    blob = puller.source._blob(entry.digest)
    data = bytearray(puller.source.fs.cat_file(blob))
    data[-3] ^= 0xFF
    puller.source.fs.pipe_file(blob, bytes(data))
    with serving(tmp_path / "b", store) as (url, _):
        r = complete(url, "math")
        assert r.status_code == 502, r.text
        assert "digest" in r.json()["error"]["message"]
    assert Registry(tmp_path / "b" / "local").list() == []


def test_the_remote_is_listed_once_per_ttl_for_names_that_exist_nowhere(tmp_path, remote):
    puller = PullThrough(Registry(tmp_path / "local"), remote, listing_ttl=3600)
    calls = []
    entries = puller.source.entries
    puller.source.entries = lambda *a: calls.append(a) or entries(*a)
    for _ in range(5):
        with pytest.raises(Exception, match="nosuch"):
            puller.resolve("nosuch")
    assert len(calls) == 1
    assert str(puller.resolve("code").ref) == "code@1"
