"""Packing sets ahead of their first request, the parts that need no vLLM engine: the packed-set
cache's no-eviction commit, and the server's `Prepacker` (`serve --prepack`) over a registry with a
stand-in engine: newest versions first, resident and tried sets left alone, paused while the engine
is busy, its figures in /admin/status and /metrics, off with --no-prepack. The engine's side (the
workers' pieces, the pause, a damaged blob, the bound) is tested on the real async engine in
tests/test_vllm_async.py."""

from __future__ import annotations

import asyncio

import torch
from test_server_http import FakeEngine, _patch_file

from expertlib.registry import Registry
from expertlib.server.settings import ServerSettings
from expertlib.vllm_plugin.packcache import PackedCache


def _rows(seed: int, n: int = 2) -> list[tuple[int, list[int], list[tuple[str, torch.Tensor]]]]:
    g = torch.Generator().manual_seed(seed)
    return [(0, list(range(n)), [("w13", torch.randn(n, 8, 16, generator=g))])]


def test_a_commit_without_eviction_keeps_every_other_entry(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 20)
    first = cache.save("sha256:a", "L", _rows(1))
    cache.configure(budget=first.nbytes + first.nbytes // 2)  # room for half of another such set
    with cache.writer("sha256:b", "L") as w:
        for layer, experts, parts in _rows(2):
            w.add(layer, experts, parts)
        assert w.commit(evict=False) is None
    st = cache.status()
    assert st["entries"] == 1 and cache.record("sha256:a", "L") is not None
    assert not list(tmp_path.glob(".*.tmp")) and cache.free() == first.nbytes // 2
    with cache.writer("sha256:c", "L") as w:  # an abandoned writer leaves nothing behind
        w.add(*_rows(3)[0])
    assert not list(tmp_path.glob(".*.tmp")) and cache.status()["entries"] == 1


class PackingEngine(FakeEngine):
    """FakeEngine with `idle` and `prepack`: records what it was asked to pack."""

    def __init__(self):
        super().__init__()
        self.busy = False
        self.packed: list[str] = []

    def idle(self) -> bool:
        return not self.busy

    async def prepack(self, opened, name=None):
        assert self.idle()
        self.packed.append(opened.name)
        return {"outcome": "packed", "bytes": 1000}


async def _started(settings: ServerSettings, engine: FakeEngine):
    from expertlib.server import ServerState

    state = ServerState(settings, engine_factory=lambda _s: engine)
    await state.start()
    assert state.ready, state.startup_error
    return state


async def _until(check, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_the_server_packs_its_registry_ahead_newest_first_and_reports_it(tmp_path):
    from expertlib.server.catalog_view import admin_status

    reg = Registry(tmp_path / "reg")
    for name, task in (("math", "math"), ("code", "code"), ("math2", "math")):
        reg.publish(_patch_file(tmp_path / f"{name}.safetensors", task))
    engine = PackingEngine()

    async def run():
        state = await _started(
            ServerSettings(base="b", registry=str(tmp_path / "reg"), expert_sets=["code"]), engine
        )
        try:
            await _until(lambda: len(engine.packed) == 2)
            assert engine.packed == ["math@2", "math@1"]  # the resident code@1 is not packed
            st = admin_status(state).engine["prepack"]
            assert st | {"packed": 2, "bytes": 2000, "pending": 0, "failed": 0, "enabled": True} == st
            metrics = state.metrics.render().decode()
            assert "expertlib_prepack_sets 2.0" in metrics and "expertlib_prepack_bytes 2000.0" in metrics

            engine.busy = True  # a set published while requests run waits for them
            state.prepacker.relist_s = 0.05
            reg.publish(_patch_file(tmp_path / "law.safetensors", "law"))
            state.prepacker.wake()
            await _until(lambda: state.prepacker.status()["pending"] == 1)
            await asyncio.sleep(0.2)
            assert engine.packed == ["math@2", "math@1"]
            engine.busy = False
            await _until(lambda: len(engine.packed) == 3)
            assert engine.packed[-1] == "law@1" and state.prepacker.status()["pending"] == 0
            await asyncio.sleep(0.2)  # listed again: nothing is packed twice
            assert len(engine.packed) == 3
        finally:
            state.shutdown()

    asyncio.run(run())


def test_a_set_another_replica_was_packing_is_asked_for_again(tmp_path):
    """ "packing elsewhere" (a replica sharing the cache held the claim) is tried again on the next
    round, like "no room"; "cached" then ends it."""
    reg = Registry(tmp_path / "reg")
    reg.publish(_patch_file(tmp_path / "math.safetensors", "math"))
    engine = PackingEngine()
    answers = iter([{"outcome": "packing elsewhere", "bytes": 0}, {"outcome": "cached", "bytes": 0}])

    async def prepack(opened, name=None):
        engine.packed.append(opened.name)
        return next(answers)

    engine.prepack = prepack

    async def run():
        state = await _started(ServerSettings(base="b", registry=str(tmp_path / "reg")), engine)
        try:
            state.prepacker.relist_s = 0.05
            state.prepacker.wake()
            await _until(lambda: len(engine.packed) == 2)
            await asyncio.sleep(0.2)  # listed again: cached, not asked a third time
            assert engine.packed == ["math@1", "math@1"] and state.prepacker.status()["pending"] == 0
        finally:
            state.shutdown()

    asyncio.run(run())


def test_no_prepack_and_no_registry_leave_it_off(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish(_patch_file(tmp_path / "math.safetensors", "math"))

    async def run():
        for settings in (
            ServerSettings(base="b", registry=str(tmp_path / "reg"), prepack=False),
            ServerSettings(base="b", registry=str(tmp_path / "reg"), packed_cache_disk=0),
            ServerSettings(base="b", registry=str(tmp_path / "reg"), verify_loads="always"),
        ):
            state = await _started(settings, PackingEngine())
            assert state.prepacker is None
            state.shutdown()

    asyncio.run(run())


def test_the_serve_flag(serve_settings):
    assert serve_settings("./base").prepack is True
    assert serve_settings("./base", "--no-prepack").prepack is False


def test_a_set_pushed_into_the_server_is_packed_ahead_at_once(tmp_path):
    """A push into the server's registry (the admin registry route) wakes the packing at once,
    without waiting for the next listing."""
    import time

    import httpx
    from server_process import ServerThread, free_port

    from expertlib.server import create_app

    reg = Registry(tmp_path / "reg")
    reg.publish(_patch_file(tmp_path / "math.safetensors", "math"))
    engine = PackingEngine()
    settings = ServerSettings(base="b", registry=str(tmp_path / "reg"), admin_key="admin-key")
    app = create_app(settings, engine_factory=lambda _s: engine)
    port = free_port()
    with ServerThread(app, port):
        state = app.state.server
        deadline = time.time() + 30
        while engine.packed != ["math@1"]:
            assert time.time() < deadline and state.startup_error is None, state.startup_error
            time.sleep(0.02)
        state.prepacker.relist_s = 3600.0  # from now on, only a push lists the registry again
        state.prepacker.wake()  # (the wait under way ends: the next one is an hour)
        time.sleep(0.3)
        other = Registry(tmp_path / "other")  # where the pushed set comes from
        entry = other.publish(_patch_file(tmp_path / "law.safetensors", "law"))
        body = other.get_path(entry).read_bytes()
        r = httpx.post(
            f"http://127.0.0.1:{port}/admin/registry/entries",
            params={"name": "law", "digest": entry.digest},
            content=body,
            headers={"Authorization": "Bearer admin-key"},
        )
        assert r.status_code == 201, r.text
        deadline = time.time() + 5
        while engine.packed != ["math@1", "law@1"]:
            assert time.time() < deadline, engine.packed
            time.sleep(0.02)


class _Rows:
    def __init__(self, experts, weights):
        self.experts = experts
        self._w13 = torch.stack([torch.cat([w.gate, w.up]) for w in weights]).clone()

    def parts(self):
        return [("w13", self._w13)]


def _big_set(path, layers: int = 4, inter: int = 256, hidden: int = 1024):
    """A set of 2 experts in each of `layers` layers, 2 x 3 x inter x hidden floats apiece (24 MiB at
    the defaults)."""
    from expertlib.identity import BaseIdentity
    from expertlib.moe import ExpertWeights
    from expertlib.patch import ExpertSet

    g = torch.Generator().manual_seed(0)

    def w():
        return ExpertWeights(
            gate=torch.randn(inter, hidden, generator=g),
            up=torch.randn(inter, hidden, generator=g),
            down=torch.randn(hidden, inter, generator=g),
        )

    base = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64, name="tiny-base")
    experts = {(layer, e): w() for layer in range(layers) for e in (1, 3)}
    digests = dict.fromkeys(experts, "sha256:" + "1" * 64)
    return ExpertSet.build(task="big", base=base, experts=experts, base_digests=digests).save(path)


def _pack(cache, path, *, between=None):
    """Run `pack_pieces` to its end with a stand-in kernel packing; `between(i)` runs before piece i."""
    from types import SimpleNamespace

    from expertlib.patch import ExpertSet
    from expertlib.vllm_plugin.prepack import pack_pieces

    digest = ExpertSet.open(path).manifest.content_digest
    ctx = SimpleNamespace(layers={layer: None for layer in range(4)})
    gen = pack_pieces(
        ctx,
        cache,
        str(path),
        digest,
        None,
        layout="L",
        pack_rows=lambda _runner, experts, weights, _reuse: _Rows(experts, weights),
        row_bytes=lambda _layer: 2 * 2 * 256 * 1024 * 4,
    )
    i = 0
    try:
        while True:
            if between is not None:
                between(i)
            next(gen)
            i += 1
    except StopIteration as stop:
        return digest, stop.value


def test_packing_ahead_maps_the_set_instead_of_reading_it_into_a_buffer(tmp_path):
    """A full-depth set is GiB: packing one ahead holds one layer's rows, not a copy of the file
    (numpy buffers are traced by tracemalloc; the map and torch's rows are not)."""
    import tracemalloc

    path = _big_set(tmp_path / "big.safetensors")
    size = path.stat().st_size
    cache = PackedCache(tmp_path / "packed", budget=1 << 30)
    tracemalloc.start()
    try:
        digest, (outcome, nbytes) = _pack(cache, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == "packed" and nbytes > 0 and cache.holds(digest, "L")
    assert peak < size // 4, (peak, size)


def test_a_set_file_changed_while_packed_ahead_leaves_no_entry(tmp_path):
    import os

    path = _big_set(tmp_path / "big.safetensors")
    cache = PackedCache(tmp_path / "packed", budget=1 << 30)

    def rewrite(i):
        if i == 3:  # after the check, while layers are packed: one byte changed in place
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                b = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([b[0] ^ 1]))

    from expertlib.errors import PatchCorruptError

    try:
        _pack(cache, path, between=rewrite)
    except PatchCorruptError as exc:
        assert "changed while it was packed" in str(exc)
    else:
        raise AssertionError("a set changed after its check was packed")
    assert cache.status()["entries"] == 0 and not list((tmp_path / "packed").glob(".*.tmp"))


def test_replicas_sharing_the_cache_pack_a_set_once(tmp_path):
    """Two processes packing the same set ahead into one cache (replicas of a server): while one
    holds the claim the other is told "packing elsewhere" and writes nothing; once it is done the
    set is cached for both."""
    path = _big_set(tmp_path / "big.safetensors")
    root = tmp_path / "packed"
    ours, theirs = PackedCache(root, budget=1 << 30), PackedCache(root, budget=1 << 30)
    digest = _digest(path)
    claim = theirs.claim(digest, "L")  # the other replica, mid-packing (its own open file: flock conflicts)
    assert claim is not None
    assert _pack(ours, path) == (digest, ("packing elsewhere", 0))
    assert not list(root.glob("*.bin")) and not list(root.glob(".*.tmp"))
    claim.close()  # the other replica is done (or gave up): the claim is free again
    assert _pack(ours, path)[1][0] == "packed"
    assert _pack(theirs, path)[1] == ("cached", 0)


def _digest(path) -> str:
    from expertlib.patch import ExpertSet

    return ExpertSet.open(path).manifest.content_digest
