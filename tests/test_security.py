"""Security: the attack cases of the hardening pass, each reproduced against the real library,
registry and HTTP server (the server over the deterministic engine double of test_server_http; the
cases that need vLLM's engine are in test_security_stress.py). Crafted files are written here.

Numbers in the test names are the cases of the attack report:
 1 forged per-expert digests      2 NaN/inf weights             3 altered files and blobs
 4 stalls (tokenising, locked index)  5 body size / auth before body  6 queue counts sequences
 7 HTTP pull bounds and digests   8 bounded numbers and texts   9 malformed headers and manifests
10 shapes against the base       11 read-only and full disks    12 keys, metrics, docs, names
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import shutil
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from click.testing import CliRunner
from test_server_http import FakeEngine, ServerThread

from expertlib.apply import apply_expert_set
from expertlib.cli.main import cli
from expertlib.compose import compose
from expertlib.errors import (
    DigestMismatchError,
    NonFiniteWeightsError,
    PatchCorruptError,
    PatchError,
    PatchFormatError,
    PatchShapeError,
    ReadOnlyRegistryError,
    RemoteError,
)
from expertlib.identity import base_identity
from expertlib.moe import ExpertWeights, load_model, read_expert
from expertlib.patch import ExpertSet
from expertlib.registry import Registry
from expertlib.registry.blobs import BlobStore
from expertlib.registry.client import HttpRemote
from expertlib.registry.hub import HubRemote
from expertlib.server import ServerSettings, create_app
from expertlib.vllm_plugin.testing import random_expert_set

API_KEY, ADMIN_KEY, METRICS_KEY = "sk-sec", "sk-sec-admin", "sk-sec-metrics"
MAP = {0: [1, 2], 1: [3]}


# --- crafted sets -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny qwen2_moe base (folder and model), a genuine set and crafted bad ones."""
    from expertlib.testing import make_tiny_model

    root = tmp_path_factory.mktemp("security")
    base_dir = root / "base"
    make_tiny_model("qwen2_moe", base_dir)
    model = load_model(base_dir)
    genuine = random_expert_set(model, "genuine", MAP, seed=1)
    return SimpleNamespace(root=root, base_dir=base_dir, model=model, genuine=genuine)


def forged(model, genuine: ExpertSet) -> ExpertSet:
    """Other weights under the genuine set's per-expert digests (manifest otherwise consistent)."""
    other = random_expert_set(model, "attacker", MAP, seed=99)
    manifest = other.manifest.model_copy(update={"expert_digests": dict(genuine.manifest.expert_digests)})
    return ExpertSet(manifest, dict(other.tensors))


def built(model, task: str, weights: dict) -> ExpertSet:
    """A self-consistent set (every digest right) with the given expert weights."""
    return ExpertSet.build(
        task=task,
        base=base_identity(model),
        experts=weights,
        base_digests={k: read_expert(model, *k).digest() for k in weights},
    )


def poisoned(model, value: float) -> ExpertSet:
    weights = {
        (layer, e): read_expert(model, layer, e).map(torch.clone) for layer, ids in MAP.items() for e in ids
    }
    weights[(0, 1)].gate[0, 0] = value
    return built(model, f"poison-{value}", weights)


def misshapen(model) -> ExpertSet:
    """Experts of half the base's intermediate size; the manifest says so consistently."""
    weights = {}
    for layer, ids in MAP.items():
        for e in ids:
            w = read_expert(model, layer, e)
            weights[(layer, e)] = ExpertWeights(
                gate=w.gate[:16].clone(), up=w.up[:16].clone(), down=w.down[:, :16].clone()
            )
    return built(model, "misshapen", weights)


def flip_tensor_byte(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[-3] ^= 0x55  # inside the last tensor's data; the header stays valid
    dst.write_bytes(bytes(data))
    return dst


@contextlib.contextmanager
def composed_on(model, **kw):
    """The transformers composer on `model`, its slots removed afterwards."""
    from expertlib.slots import remove_slots

    try:
        yield compose(model, **kw)
    finally:
        remove_slots(model)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# --- 1, 2, 3: what enters slots, the registry or a model is checked ---------------------------------


def test_1_forged_digests_refused_everywhere(world, tmp_path):
    bad = forged(world.model, world.genuine)
    with pytest.raises(DigestMismatchError, match="do not match their tensors"):
        bad.verify()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(DigestMismatchError):
        reg.publish(bad)
    assert reg.list() == []
    # the composer: loaded first, the forged set would hand its weights to the genuine set's slots
    x = torch.randint(4, 90, (1, 8))
    with composed_on(world.model, slots=4, max_sets=2) as composed:
        with pytest.raises(DigestMismatchError):
            composed.load(bad)
        composed.load(world.genuine)
        with torch.no_grad():
            got = composed(x, expert_sets=["genuine"]).logits
    with apply_expert_set(world.model, world.genuine):
        want = logits(world.model, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_2_non_finite_weights_refused(world, tmp_path, value):
    bad = poisoned(world.model, value)
    with pytest.raises(NonFiniteWeightsError, match="NaN or infinite"):
        bad.verify()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(NonFiniteWeightsError):
        reg.publish(bad.save(tmp_path / "bad.safetensors"))
    assert reg.list() == []
    x = torch.randint(4, 90, (1, 8))
    before = logits(world.model, x)
    with pytest.raises(NonFiniteWeightsError):
        apply_expert_set(world.model, ExpertSet.open(tmp_path / "bad.safetensors"))
    assert torch.equal(logits(world.model, x), before)  # nothing was written
    with composed_on(world.model, slots=4) as composed, pytest.raises(NonFiniteWeightsError):
        composed.load(bad)


def test_3_altered_file_and_blob_refused(world, tmp_path):
    good = world.genuine.save(tmp_path / "good.safetensors")
    bad = flip_tensor_byte(good, tmp_path / "altered.safetensors")
    x = torch.randint(4, 90, (1, 8))
    before = logits(world.model, x)
    with pytest.raises(DigestMismatchError, match="altered or damaged"):
        apply_expert_set(world.model, ExpertSet.open(bad))
    assert torch.equal(logits(world.model, x), before)
    with composed_on(world.model, slots=4) as composed, pytest.raises(DigestMismatchError):
        composed.load(bad)
    # a registry blob altered after publish: every registry-backed open rechecks it
    reg = Registry(tmp_path / "reg")
    entry = reg.publish(good)
    blob = reg.blobs.path(entry.digest)
    blob.chmod(0o644)
    flip_tensor_byte(blob, blob)
    with pytest.raises(DigestMismatchError):
        reg.open("genuine")
    assert reg.open("genuine", verify=False) is not None  # the opt-out, for trusted local files only


# --- 9, 10: malformed files and sets for another base ------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [1]},  # no data_offsets
        "not an object",
        {"dtype": "F32", "shape": [1], "data_offsets": "0,4"},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    ],
)
def test_9_malformed_header_entries_are_clear_errors(tmp_path, entry):
    path = _safetensors(tmp_path / "bad.safetensors", {"__metadata__": {}, "t": entry}, b"\0" * 4)
    with pytest.raises(PatchCorruptError, match="tensor description"):
        ExpertSet.open(path)
    with pytest.raises(PatchCorruptError):
        Registry(tmp_path / "reg").publish(path)
    result = CliRunner().invoke(cli, ["publish", str(path), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_9_header_length_0x80_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 0x180) + b'{"a": 1')  # header claims 384 bytes, file is short
    with pytest.raises(PatchError) as err:
        ExpertSet.open(path)
    assert "pickle" not in str(err.value) and "truncated" in str(err.value)
    real_pickle = tmp_path / "model.safetensors"
    real_pickle.write_bytes(b"\x80\x04\x95" + b"\x17" * 40)
    with pytest.raises(PatchFormatError, match="pickle"):
        ExpertSet.open(real_pickle)


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        '{"wire_version": "abc", "entries": []}',
        '{"wire_version": "7", "entries": []}',
        '{"wire_version": 7, "entries": []}',
        '{"wire_version": 1, "entries": [{"name": "x", "published_at": "yesterday"}]}',
    ],
)
def test_9_bad_remote_listings_are_remote_errors(tmp_path, body):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    remote = HttpRemote("http://remote", client=httpx.Client(base_url="http://remote", transport=transport))
    with pytest.raises(RemoteError, match="invalid EntryList"):
        remote.entries(None, None)


@pytest.mark.parametrize(
    "update",
    [
        {"wire_version": "7"},
        {"wire_version": 7},
        {"wire_version": "abc"},
        {"name": "../x"},
        {"digest": "sha256:../x"},
    ],
)
def test_9_bad_hub_manifests_are_remote_errors(world, tmp_path, monkeypatch, update):
    from expertlib.registry.hub import HubManifest

    m = world.genuine.manifest
    good = HubManifest(
        name="genuine", version=1, digest="sha256:" + "ab" * 32, size=10, base=m.base, manifest=m
    )
    (tmp_path / "expertlib.json").write_text(json.dumps({**json.loads(good.model_dump_json()), **update}))
    monkeypatch.setattr(HubRemote, "_download", lambda self, name: tmp_path / name)
    with pytest.raises(RemoteError, match="invalid expertlib.json"):
        HubRemote.from_url("hf://me/set").entries(None, None)


def test_10_shapes_checked_against_the_base(world, tmp_path):
    bad = misshapen(world.model)
    path = bad.save(tmp_path / "misshapen.safetensors")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(PatchShapeError, match="expert shapes"):
        reg.publish(path, base=world.base_dir)  # base folder known: checked against it
    reg.publish(world.genuine)
    with pytest.raises(PatchShapeError, match="expert shapes"):
        reg.publish(path)  # no base given: checked against the sets of the same base
    assert [e.name for e in reg.list()] == ["genuine"]
    x = torch.randint(4, 90, (1, 8))
    before = logits(world.model, x)
    with pytest.raises(PatchShapeError, match="expert shapes"):
        apply_expert_set(world.model, bad)
    assert torch.equal(logits(world.model, x), before)


# --- 7: HTTP pull -------------------------------------------------------------------------------------


def _entry_json(world, **update) -> dict:
    es = world.genuine
    entry = {
        "name": "genuine",
        "version": 1,
        "digest": "sha256:" + "ab" * 32,
        "base": es.manifest.base.model_dump(),
        "tags": ["latest"],
        "size": 1000,
        "content_digest": es.manifest.content_digest,
        "task": "genuine",
        "num_experts": 3,
        "experts": {"0": [1, 2], "1": [3]},
        "dtype": "float32",
        "published_at": "2026-01-01T00:00:00+00:00",
    }
    entry.update(update)
    return entry


def test_7_remote_digest_and_name_validated_before_any_url(world):
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requested.append(request.url.path)
        if request.url.path == "/entries":
            evil = _entry_json(world, digest="sha256:../../admin/status")
            return httpx.Response(200, json={"wire_version": 1, "entries": [evil]})
        return httpx.Response(200, json={"leaked": True})

    client = httpx.Client(base_url="http://remote", transport=httpx.MockTransport(handler))
    remote = HttpRemote("http://remote", client=client)
    with pytest.raises(RemoteError, match="digest"):
        remote.entries(None, None)
    assert requested == ["/entries"]
    for bad in (_entry_json(world, name="../../etc"), _entry_json(world, version=10**30)):
        with pytest.raises(ValueError):
            from expertlib.registry.protocol import Entry

            Entry.model_validate(bad)


def test_7_pull_stops_at_the_announced_size(world, tmp_path):
    from expertlib.registry.protocol import Entry

    sent = 0

    def endless():
        nonlocal sent
        while sent < 50 * 2**20:  # would send 50 MiB for a 1000-byte entry
            sent += 2**16
            yield b"\0" * 2**16

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=endless()))
    remote = HttpRemote("http://remote", client=httpx.Client(base_url="http://remote", transport=transport))
    staging = BlobStore(tmp_path / "reg")
    with pytest.raises(RemoteError, match="more than the 1000 bytes"):
        remote.fetch(Entry.model_validate(_entry_json(world)), staging)
    assert sent <= 2**20 + 2**16  # stopped within one chunk of the limit
    assert list(staging.tmp_dir.iterdir()) == []  # nothing left behind


# --- 11: read-only registries, full disks, missing sources -------------------------------------------


def test_11_read_only_snapshot_reads_and_stays_untouched(world, tmp_path, monkeypatch):
    live = Registry(tmp_path / "live")
    live.publish(world.genuine, tags=["stable"])
    snap = tmp_path / "snapshot"
    shutil.copytree(live.root, snap, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    before = sorted(str(p.relative_to(snap)) for p in snap.rglob("*"))
    monkeypatch.setenv("EXPERTLIB_REGISTRY_READ_ONLY", "1")  # a mounted snapshot (root ignores chmod)
    runner = CliRunner()
    for args in (["list"], ["show", "genuine@stable"], ["verify"]):
        result = runner.invoke(cli, [*args, "--registry", str(snap)])
        assert result.exit_code == 0, result.output
    with pytest.raises(ReadOnlyRegistryError):
        Registry(snap).publish(world.genuine, task="other")
    result = runner.invoke(cli, ["rm", "genuine@1", "--registry", str(snap)])
    assert result.exit_code == 2 and "read-only" in result.output and "Traceback" not in result.output
    monkeypatch.delenv("EXPERTLIB_REGISTRY_READ_ONLY")
    mine = Registry(tmp_path / "mine")
    monkeypatch.setenv("EXPERTLIB_REGISTRY_READ_ONLY", "1")
    monkeypatch.setattr("expertlib.registry.folder.read_only_folder", lambda root: root == snap)
    assert mine.pull(str(snap)).copied == ["genuine@1"]
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*")) == before  # not one file written


def test_11_disk_full_is_one_line_and_leaves_no_state(world, tmp_path, monkeypatch):
    path = world.genuine.save(tmp_path / "g.safetensors")
    reg = Registry(tmp_path / "reg")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("expertlib.registry.blobs.os.fsync", full)
    result = CliRunner().invoke(cli, ["publish", str(path), "--registry", str(reg.root)])
    assert result.exit_code == 2, result.output
    assert "no space left" in result.output.lower() and "hint" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 2
    monkeypatch.undo()
    assert reg.list() == [] and list(reg.blobs.tmp_dir.iterdir()) == []


def test_11_pull_never_creates_its_source(tmp_path):
    result = CliRunner().invoke(cli, ["pull", str(tmp_path / "nowhere"), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 2 and "no expertlib registry" in result.output
    assert not (tmp_path / "nowhere").exists()


# --- 12 (keys) without a server --------------------------------------------------------------------


def test_12_equal_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="must differ"):
        ServerSettings(base="b", api_key="same", admin_key="same")
    with pytest.raises(ValueError, match="must differ"):
        ServerSettings(base="b", api_key="same", metrics_key="same")
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--api-key", "k", "--admin-key", "k"])
    assert result.exit_code == 2 and "must differ" in result.output


# --- the server (engine double), cases 4, 5, 6, 8, 9, 12 ------------------------------------------------


class SlowTokenizer:
    """The double's tokenizer, slowed down like a real one on a multi-megabyte prompt (no GIL held)."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, text, **kw):
        if isinstance(text, str) and len(text) > 5_000:
            time.sleep(2.0)
            return self.inner.encode(text[:100], **kw)
        return self.inner.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


@pytest.fixture(scope="module")
def server(world):
    engine = FakeEngine(delay=0.01)
    engine.tokenizer = SlowTokenizer(engine.tokenizer)
    root = world.root / "server"
    reg = Registry(root / "registry")
    reg.publish(world.genuine)
    reg.publish(random_expert_set(world.model, "other", {0: [4]}, seed=5))
    settings = ServerSettings(
        base=str(world.base_dir),
        registry=str(reg.root),
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        metrics_key=METRICS_KEY,
        max_queue=8,
        max_request_sequences=6,
        max_model_len=256,
        max_body_bytes=2**20,
    )

    async def factory(_settings):
        return engine

    with ServerThread(create_app(settings, engine_factory=factory)) as thread:
        thread.wait_ready()
        yield SimpleNamespace(url=thread.url, engine=engine, registry=reg, root=root, world=world)


def post(server, path, body, key=API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (str, bytes)):
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=body, headers=headers, timeout=30, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kw)


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def test_4_long_prompt_does_not_stall_health(server):
    result = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "r",
            post(server, "/v1/completions", {"model": "genuine", "prompt": "a" * 8_000, "max_tokens": 2}),
        )
    )
    t.start()
    time.sleep(0.3)  # the request is being tokenised now
    start = time.perf_counter()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert time.perf_counter() - start < 1.0
    t.join(30)
    assert result["r"].status_code == 200


def test_4_locked_index_answers_503_quickly(server):
    con = sqlite3.connect(str(server.registry.root / "index.db"), isolation_level=None)
    con.execute("PRAGMA locking_mode = EXCLUSIVE")  # in WAL mode, this is what keeps readers out
    con.execute("BEGIN EXCLUSIVE")
    con.execute("INSERT INTO meta VALUES ('lock', 'held')")
    try:
        start = time.perf_counter()
        r = post(server, "/v1/completions", {"model": "other@1", "prompt": "hi", "max_tokens": 2})
        took = time.perf_counter() - start
        err = openai_error(r, 503)
        assert "locked" in err["message"] and r.headers["retry-after"].isdigit()
        assert took < 5.0
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert (
        post(server, "/v1/completions", {"model": "other@1", "prompt": "hi", "max_tokens": 2}).status_code
        == 200
    )


def _raw_request(server, head: str, body: bytes = b"") -> tuple[int, float]:
    """Send headers (claiming a big body) and a few bytes; the status and how long the answer took."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        start = time.perf_counter()
        s.sendall(head.encode() + body)
        data = s.recv(4096)
        took = time.perf_counter() - start
    return int(data.split(b" ", 2)[1]), took


def test_5_key_and_size_checked_before_the_body_is_read(server):
    big = 200 * 2**20
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {big}\r\n{{auth}}\r\n"
    )
    status, took = _raw_request(server, head.replace("{auth}", ""), b'{"model":')
    assert status == 401 and took < 5  # answered without waiting for 200 MB
    status, took = _raw_request(server, head.replace("{auth}", f"Authorization: Bearer {API_KEY}\r\n"), b"{")
    assert status == 413 and took < 5
    # no Content-Length (chunked): counted as it arrives
    chunks = (b"x" * 65536 for _ in range(40))
    r = httpx.post(
        server.url + "/v1/completions",
        content=chunks,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    openai_error(r, 413)


def test_6_queue_counts_sequences(server):
    prompts = ["p"] * 500
    err = openai_error(post(server, "/v1/completions", {"model": "genuine", "prompt": prompts, "n": 16}), 400)
    assert "sequences" in err["message"]
    slow = {"model": "genuine", "prompt": ["a", "b"], "n": 3, "max_tokens": 60, "temperature": 1.0}
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(server, "/v1/completions", slow)))
    t.start()
    time.sleep(0.2)  # 6 of 8 sequences admitted
    r = post(server, "/v1/completions", {"model": "genuine", "prompt": ["c", "d", "e"], "max_tokens": 2})
    openai_error(r, 429)
    assert r.headers["retry-after"].isdigit()
    assert (
        post(server, "/v1/completions", {"model": "genuine", "prompt": "f", "max_tokens": 2}).status_code
        == 200
    )
    t.join(30)
    assert result["r"].status_code == 200


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "genuine@99999999999999999999999", "prompt": "x"}, 404),
        ({"model": "genuine", "prompt": "x", "stop": ""}, 400),
        ({"model": "genuine", "prompt": "x", "n": 4, "temperature": 0}, 400),
        ({"model": "genuine", "prompt": "x", "seed": 2**70}, 400),
        ({"model": "genuine", "prompt": "x", "best_of": 5}, 400),
        ('{"model": "genuine", "prompt": "a\\ud800b"}', 400),
        ('{"model": "genuine", "messages": [{"role": "user", "content": "\\udfff"}]}', 400),
    ],
)
def test_8_bad_numbers_and_texts_are_4xx(server, body, status):
    path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
    openai_error(post(server, path, body), status)


def test_9_malformed_patch_over_admin_load_and_push(server, tmp_path):
    bad = _safetensors(tmp_path / "bad.safetensors", {"__metadata__": {}, "t": {"dtype": "F32"}}, b"\0" * 4)
    err = openai_error(post(server, "/admin/sets/load", {"name": str(bad)}, key=ADMIN_KEY), 400)
    assert "tensor description" in err["message"]
    import hashlib

    data = bad.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.post(
        server.url + "/admin/registry/entries",
        params={"name": "bad", "digest": digest},
        content=data,
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    openai_error(r, 400)


def test_12_metrics_and_docs_need_a_key(server):
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 401, path
    assert (
        httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    )
    for key in (METRICS_KEY, ADMIN_KEY):
        assert (
            httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        )
    assert (
        httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).status_code
        == 200
    )


def test_12_no_filesystem_paths_in_model_list(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
    assert str(server.world.base_dir) not in r.text and str(server.root) not in r.text


@pytest.mark.parametrize("task", ["../../etc/passwd", "base"])
def test_12_bare_patch_task_names_validated(server, tmp_path, task):
    es = server.world.genuine
    bad = ExpertSet(es.manifest.model_copy(update={"task": task}), dict(es.tensors))
    path = bad.save(tmp_path / "named.safetensors")
    err = openai_error(post(server, "/admin/sets/load", {"name": str(path)}, key=ADMIN_KEY), 400)
    assert task in err["message"] or "name" in err["message"]
    assert task not in server.engine.sets


def test_engine_double_still_serves(server):
    """The checks above refuse bad input only: a well-formed request still answers."""
    r = post(server, "/v1/completions", {"model": "genuine", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert asyncio.iscoroutinefunction(server.engine.load)


def test_1_2_sets_published_before_the_checks_are_caught(world, tmp_path, monkeypatch):
    """A registry filled by an older expertlib (no digest recompute, no finiteness check): `verify`
    reports the forged and the NaN set, and opening them for use refuses them."""
    reg = Registry(tmp_path / "reg")
    monkeypatch.setattr(ExpertSet, "verify", lambda self, **kw: {})
    monkeypatch.setattr(ExpertSet, "verify_streamed", lambda self, scan, key: {})  # publish's one-pass check
    reg.publish(forged(world.model, world.genuine), task="forged")
    reg.publish(poisoned(world.model, float("nan")), task="nan")
    monkeypatch.undo()
    report = reg.verify()
    assert sorted(r for p in report.problems for r in p.refs) == ["forged@1", "nan@1"]
    for name in ("forged", "nan"):
        with pytest.raises(PatchError):
            reg.open(name)
