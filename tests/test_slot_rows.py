"""A set's experts are packed once into the kernel's final layout (`pack_rows`) and kept in the
workers' host cache so; a load copies those rows into slots (`copy_rows`), one copy per part. The
load's work runs as one job, inline or on a thread while forward steps go on (`HostCache.stage`)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from expertlib.moe import ExpertWeights
from expertlib.vllm_plugin.hostcache import HostCache


def _cpu_runner(n: int, inter: int, hidden: int, dtype=torch.bfloat16):
    """A stand-in MoE runner on vLLM's CPU kernel (padding and prepacking as vLLM does)."""
    pytest.importorskip("vllm")
    from expertlib.vllm_plugin.testing import cpu_moe_runner

    return cpu_moe_runner(n, inter, hidden, dtype)


def _weights(k: int, inter: int, hidden: int, seed: int = 0) -> list[ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return [
        ExpertWeights(
            gate=torch.randn(inter, hidden, generator=g).bfloat16(),
            up=torch.randn(inter, hidden, generator=g).bfloat16(),
            down=torch.randn(hidden, inter, generator=g).bfloat16(),
        )
        for _ in range(k)
    ]


@pytest.mark.parametrize("inter", [64, 48])  # 48: padded to 64 by the CPU kernel
def test_packed_rows_are_what_vllm_would_hold(inter):
    """Rows packed straight into place (no padded staging unless the kernel pads) equal vLLM's own
    post-processing of the same weights (pad, then prepack the stacked experts), and a load copies
    exactly those rows into the slots it was given."""
    from expertlib.vllm_plugin.worker import copy_rows, pack_rows, runtime_layout

    hidden = 64
    runner = _cpu_runner(6, inter, hidden)
    weights = _weights(3, inter, hidden)
    w13 = torch.stack([torch.cat([w.gate, w.up]) for w in weights])  # (3, 2I, H) checkpoint layout
    w2 = torch.stack([w.down for w in weights])  # (3, H, I)
    want13, want2 = runtime_layout(runner.routed_experts, w13, w2)
    rows = pack_rows(runner, [10, 11, 12], weights)
    assert torch.equal(rows.w13, want13) and torch.equal(rows.w2, want2)
    assert rows.nbytes == want13.numel() * 2 + want2.numel() * 2

    copy_rows(runner, [4, 1], rows, [12, 10])
    dst = runner.routed_experts
    assert torch.equal(dst.w13_weight[4], want13[2]) and torch.equal(dst.w13_weight[1], want13[0])
    assert torch.equal(dst.w2_weight[4], want2[2]) and torch.equal(dst.w2_weight[1], want2[0])
    untouched = [0, 2, 3, 5]
    assert dst.w13_weight[untouched].eq(7).all() and dst.w2_weight[untouched].eq(7).all()


@pytest.mark.parametrize("inter", [64, 48])
def test_a_load_while_no_request_runs_packs_on_two_threads_alike(inter):
    """While no request runs a load packs half of each layer's experts on the helper thread: the
    rows are exactly those of one thread's packing, and the helper did pack some."""
    from expertlib.vllm_plugin import worker
    from expertlib.vllm_plugin.hostcache import load_helper

    hidden, n = 64, 5
    runner = _cpu_runner(2 * n, inter, hidden)
    dst = runner.routed_experts
    weights = _weights(n, inter, hidden, seed=3)
    packer = worker.kernel_layout(dst, (n, 2 * inter, hidden), (n, hidden, inter))

    def rows(first: int):
        return (
            [dst.w13_weight.data[p : p + 1] for p in range(first, first + n)],
            [dst.w2_weight.data[p : p + 1] for p in range(first, first + n)],
        )

    worker._pack_into(packer, weights, *rows(0))
    threads = []
    original = worker._pack_into

    def watched(*a):
        threads.append(threading.current_thread().name)
        original(*a)

    try:
        worker._pack_into = watched
        worker._pack_spread(packer, weights, *rows(n))
    finally:
        worker._pack_into = original
    assert torch.equal(dst.w13_weight[:n], dst.w13_weight[n:]) and torch.equal(
        dst.w2_weight[:n], dst.w2_weight[n:]
    )
    assert sorted(threads) == sorted(
        [threading.current_thread().name, load_helper()._thread_name_prefix + "_0"]
    )


@pytest.fixture
def set_file(tmp_path):
    from expertlib.identity import BaseIdentity
    from expertlib.patch import ExpertSet

    weights = _weights(2, 32, 32)
    base = BaseIdentity(model_type="qwen2_moe", config_digest="sha256:" + "0" * 64)
    es = ExpertSet.build(
        task="t",
        base=base,
        experts={(0, 1): weights[0], (0, 3): weights[1]},
        base_digests={(0, 1): "sha256:" + "1" * 64, (0, 3): "sha256:" + "2" * 64},
    )
    return es.save(tmp_path / "t.safetensors"), es.manifest.content_digest


def test_the_host_cache_keeps_what_was_made_of_the_checked_bytes(set_file):
    """A set is read, checked and prepared once; a reload takes the prepared rows (no read, no
    check, no packing); another set in the same file, or a digest that is not the file's, is
    never served from the cache."""
    path, digest = set_file
    cache = HostCache(budget=1 << 30)
    made = []

    def prepare(es):
        made.append(es.manifest.content_digest)
        return {"rows": torch.cat([t.flatten() for t in es.tensors.values()])}

    size = lambda e: e["rows"].numel() * 2  # noqa: E731
    first = cache.entry(str(path), digest, None, prepare, size)
    cache.unstage(str(path))
    again = cache.entry(str(path), digest, None, prepare, size)
    assert again is first and made == [digest] and (cache.hits, cache.misses) == (1, 1)
    assert cache.status()["bytes"] == size(first)

    from expertlib.errors import DigestMismatchError

    cache.unstage(str(path))
    with pytest.raises(DigestMismatchError):
        cache.entry(str(path), "sha256:" + "f" * 64, None, prepare, size)
    assert made == [digest]  # refused before anything is made of the bytes

    small = HostCache(budget=1)  # over the budget: used for the load, not kept
    small.entry(str(path), digest, None, prepare, size)
    small.unstage(str(path))
    assert small.status()["paths"] == [] and small.nbytes == 0


def test_a_background_job_is_polled_and_never_overlaps_another():
    cache = HostCache()
    gate, ran = threading.Event(), []

    def slow():
        gate.wait(10)
        ran.append("a")

    assert cache.stage("a", slow, background=True) is False
    assert cache.stage("a", slow, background=True) is False  # still running: poll again
    # its caller gave up (another load now): the new job waits until the old one is done
    assert cache.stage("b", lambda: ran.append("b"), background=True) is False
    assert ran == []
    gate.set()
    while not cache.stage("b", lambda: ran.append("b"), background=True):
        pass
    assert ran == ["a", "b"] and not cache._reading

    def broken():
        raise ValueError("bad bytes")

    assert cache.stage("c", broken, background=True) is False
    with pytest.raises(ValueError, match="bad bytes"):
        while not cache.stage("c", broken, background=True):
            pass
    assert not cache._reading
    assert cache.stage("d", lambda: ran.append("d")) is True and ran[-1] == "d"  # inline


def test_a_poll_may_wait_for_the_job_it_polls():
    """`stage(..., wait=S)` answers as soon as the job's slots are written (not after its tail), or
    after S seconds with False; a new job first waits for another job's tail to end."""
    from expertlib.vllm_plugin.hostcache import slots_written

    cache = HostCache()
    tail_done = threading.Event()

    def work():
        time.sleep(0.05)
        slots_written()
        time.sleep(0.3)  # the tail: copies kept after the load is done
        tail_done.set()

    t = time.perf_counter()
    assert cache.stage("a", work, background=True, wait=5.0) is True
    assert time.perf_counter() - t < 0.3 and not tail_done.is_set()
    assert cache.stage("b", lambda: None, background=True, wait=0.01) is False  # a's tail runs
    assert cache.stage("b", lambda: None, background=True, wait=5.0) is True and tail_done.is_set()
    gate = threading.Event()
    t = time.perf_counter()
    assert cache.stage("c", lambda: gate.wait(10), background=True, wait=0.1) is False
    assert 0.1 <= time.perf_counter() - t < 1.0
    gate.set()
    assert cache.stage("c", lambda: None, background=True, wait=5.0) is True


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ CPUs"
)
def test_a_job_runs_beside_the_forward_steps_not_on_their_core(monkeypatch):
    """vLLM binds the worker's thread to the forward steps' cores; a load's job started from it runs
    on any CPU, with one torch thread (no second OpenMP team beside the steps' own), and leaves the
    starting thread's torch threads as they were. vLLM's CPU worker turns `torch.set_num_threads`
    into a no-op; the job's setting must not depend on it."""
    everywhere, seen = os.sched_getaffinity(0), {}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # as vLLM's CPU worker does
    threads = torch._C.get_num_threads()
    torch._C.set_num_threads(2)  # the steps' team size on a 2-core machine

    def worker_thread():
        os.sched_setaffinity(0, {min(everywhere)})  # as vLLM's CPU backend binds it
        before = torch.get_num_threads()
        cache = HostCache()

        def work():
            seen.update(cpus=os.sched_getaffinity(0), threads=torch.get_num_threads())

        while not cache.stage("k", work, background=True):
            time.sleep(0.005)
        seen["after"] = (torch.get_num_threads(), before)

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join()
    torch._C.set_num_threads(threads)
    assert seen["cpus"] == everywhere and seen["threads"] == 1
    assert seen["after"][0] == seen["after"][1] == 2


def test_a_load_reads_into_the_one_reused_buffer(set_file):
    """Sets are read into one buffer kept from load to load (fresh memory is slow to touch in a vLLM
    worker); the tensors read are the file's, and a file over the limit gets a fresh buffer."""
    from expertlib.patch import ExpertSet
    from expertlib.vllm_plugin.hostcache import ReadBuffer

    path, _ = set_file
    scratch = ReadBuffer()
    want = ExpertSet.open(path).read_verified().tensors
    for _ in range(2):
        got = ExpertSet.open(path).read_verified(scratch=scratch).tensors
        base = scratch._buf.ctypes.data
        for name, t in got.items():
            assert torch.equal(t, want[name])
            assert base <= t.data_ptr() < base + scratch._buf.size  # a view on the kept buffer
    assert ReadBuffer(limit=16)(path.stat().st_size) is None


def _rows(n: int, seed: int):
    from expertlib.vllm_plugin.worker import LayerRows

    g = torch.Generator().manual_seed(seed)
    return {
        0: LayerRows(
            list(range(n)),
            torch.randn(n, 8, 32, generator=g).bfloat16(),
            torch.randn(n, 32, 4, generator=g).bfloat16(),
        )
    }


def test_rows_kept_after_a_load_reuse_the_memory_of_the_set_let_go():
    """The copy of a load's slot rows for the host cache is made on the memory of the entry it
    replaces (faulted in already: fresh memory is slow to touch in a vLLM worker), not on fresh
    memory; what it replaced is gone from the cache, and the new rows read back as written."""
    old = _rows(2, 0)
    size = sum(r.nbytes for r in old.values())
    cache = HostCache(budget=size)
    cache.keep("a", "sha256:a", old, size)
    memory = {t.untyped_storage().data_ptr() for _, t in old[0].parts()}
    del old
    cache.make_room(size)  # before the copy: the least recently used set is let go
    assert cache.status()["paths"] == []
    new = _rows(2, 1)
    copies = {}
    for name, t in new[0].parts():
        out = cache.empty(tuple(t.shape), t.dtype)
        assert out.untyped_storage().data_ptr() in memory  # written again, not fresh
        copies[name] = out.copy_(t)
    assert torch.equal(copies["w13"], new[0].w13) and torch.equal(copies["w2"], new[0].w2)
    fresh = cache.empty((2, 8, 32), torch.bfloat16)  # nothing spare left: fresh memory
    assert fresh.untyped_storage().data_ptr() not in memory


def test_memory_still_read_elsewhere_is_never_written_again():
    """Rows the packed-set cache's writer (or a staged load) still holds are not handed out for a
    new copy until they are let go there; a smaller budget frees the spare memory."""
    held = _rows(2, 0)
    size = sum(r.nbytes for r in held.values())
    want = held[0].w13.clone()
    cache = HostCache(budget=size)
    cache.keep("a", "sha256:a", held, size)
    cache.make_room(size)
    out = cache.empty(tuple(want.shape), want.dtype)
    out.fill_(0)
    assert torch.equal(held[0].w13, want)  # the writer's rows are untouched
    w13_memory = held[0].w13.untyped_storage().data_ptr()
    del held, out
    assert cache.empty(tuple(want.shape), want.dtype).untyped_storage().data_ptr() == w13_memory

    cache.keep("b", "sha256:b", _rows(2, 1), size)
    cache.make_room(size)
    assert cache.status()["spare_bytes"] >= size
    cache.resize(0)  # memory given back: nothing kept spare
    assert cache.status()["spare_bytes"] == 0


def test_a_copy_too_large_to_keep_lets_nothing_go():
    """Room is made only for rows the budget can keep: a set over the budget evicts no kept set."""
    kept = _rows(2, 0)
    size = sum(r.nbytes for r in kept.values())
    cache = HostCache(budget=size)
    cache.keep("a", "sha256:a", kept, size)
    cache.make_room(2 * size)
    assert cache.status()["paths"] == ["a"]


def test_a_copy_takes_the_memory_nothing_else_holds():
    """Of the sets let go for a copy, one the packed-set writer still holds is passed over and one
    nothing holds any more is taken; spare memory never takes the cache over its budget."""
    first, second = _rows(2, 0), _rows(2, 1)
    size = sum(r.nbytes for r in first.values())
    cache = HostCache(budget=2 * size)
    cache.keep("a", "sha256:a", first, size)
    cache.keep("b", "sha256:b", second, size)
    free = {t.untyped_storage().data_ptr() for _, t in first[0].parts()}
    del first
    cache.make_room(2 * size)  # both let go; `second` (the writer's) still holds "b"
    assert cache.status()["spare_bytes"] == 2 * size
    for _, t in second[0].parts():
        got = cache.empty(tuple(t.shape), t.dtype)
        assert got.untyped_storage().data_ptr() in free
    cache.keep("c", "sha256:c", _rows(2, 2), size)
    cache.keep("d", "sha256:d", _rows(2, 3), size)
    assert cache.status()["bytes"] + cache.status()["spare_bytes"] <= cache.budget


def test_a_flush_waits_for_the_write_a_load_s_tail_asks_for(monkeypatch):
    """Flushing the packed-set cache waits for a load's job still running: its tail asks for the
    write at its end, after the load was answered (a flush used to return before that)."""
    from expertlib.vllm_plugin import hostcache, packcache
    from expertlib.vllm_plugin.hostcache import slots_written
    from expertlib.vllm_plugin.worker import SlotWorkerExtension

    cache = HostCache()
    monkeypatch.setattr(hostcache, "HOST_CACHE", cache)
    asked: list[str] = []

    def work():
        slots_written()
        time.sleep(0.2)  # the tail: copies kept, then the write asked for
        asked.append("write")

    assert cache.stage("a", work, background=True, wait=5.0) is True and asked == []
    flushed = []
    monkeypatch.setattr(packcache.PACKED_CACHE, "flush", lambda: flushed.append(list(asked)))
    monkeypatch.setattr(packcache.PACKED_CACHE, "status", lambda: {})
    SlotWorkerExtension().expertlib_packed_cache(flush=True)
    assert flushed == [["write"]]
