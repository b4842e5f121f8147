"""The packed-set disk cache: a set packed in a kernel's layout, kept on disk per (content digest,
layout), read straight into slot rows only while its data file is exactly as written (device, inode,
size, mtime, ctime); anything else is refused and removed; the cache stays within its bound, least
recently used entries leaving first."""

from __future__ import annotations

import os

import pytest
import torch

from expertlib.vllm_plugin.packcache import PackedCache

DIGEST, LAYOUT = "sha256:" + "a" * 64, "layout-1"


def _layers(seed: int = 0, n: int = 3, rows: int = 8, cols: int = 16):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(n, 2 * rows, cols, generator=g).bfloat16()
    w2 = torch.randn(n, cols, rows, generator=g).bfloat16()
    return [(0, [1, 4, 6], [("w13", w13), ("w2", w2)]), (2, [0, 5, 7], [("w13", w13 * 2), ("w2", w2 * 2)])]


def _read_all(cache: PackedCache, rec, layers):
    """Every row of the entry read into fresh tensors; None when refused."""
    out, targets = {}, []
    for layer, experts, parts in layers:
        for name, t in parts:
            for i, e in enumerate(experts):
                dst = torch.empty_like(t[i])
                out[(layer, name, e)] = dst
                targets.append((layer, name, e, dst))
    return out if cache.read_into(rec, targets) else None


def test_rows_come_back_as_written(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 30)
    layers = _layers()
    cache.save(DIGEST, LAYOUT, layers)
    rec = cache.record(DIGEST, LAYOUT)
    got = _read_all(cache, rec, layers)
    for layer, experts, parts in layers:
        for name, t in parts:
            for i, e in enumerate(experts):
                assert torch.equal(got[(layer, name, e)], t[i])
    assert cache.hits == 1 and cache.refused == 0
    # another set, or another kernel layout, never finds these bytes
    assert cache.record("sha256:" + "b" * 64, LAYOUT) is None
    assert cache.record(DIGEST, "layout-2") is None
    assert cache.refused == 0


@pytest.mark.parametrize("how", ["bytes, mtime set back", "same size, new file", "shorter", "record edited"])
def test_a_changed_entry_is_refused_and_removed(tmp_path, how):
    cache = PackedCache(tmp_path, budget=1 << 30)
    layers = _layers()
    rec = cache.save(DIGEST, LAYOUT, layers)
    data, meta = tmp_path / f"{rec.key}.bin", tmp_path / f"{rec.key}.json"
    raw = bytearray(data.read_bytes())
    st = data.stat()
    if how == "bytes, mtime set back":
        with open(data, "r+b") as f:
            f.seek(100)
            f.write(bytes([raw[100] ^ 0xFF]))
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime moves anyway
        assert data.stat().st_mtime_ns == st.st_mtime_ns
    elif how == "same size, new file":
        raw[100] ^= 0xFF
        data.unlink()
        data.write_bytes(bytes(raw))
    elif how == "shorter":
        data.write_bytes(bytes(raw[:-2]))
    else:  # a record claiming another file state
        meta.write_text(meta.read_text().replace(f"[{st.st_dev},", f"[{st.st_dev + 1},"))
    assert cache.record(DIGEST, LAYOUT) is None
    assert cache.refused == 1 and not data.exists() and not meta.exists()


def test_a_file_changed_while_being_read_is_refused(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 30)
    layers = _layers()
    cache.save(DIGEST, LAYOUT, layers)
    rec = cache.record(DIGEST, LAYOUT)  # checked; then the file changes before the read
    data = tmp_path / f"{rec.key}.bin"
    with open(data, "r+b") as f:
        f.write(b"\0\0")
    assert _read_all(cache, rec, layers) is None
    assert cache.refused == 1 and not data.exists()


def test_a_row_that_does_not_fit_its_destination_is_an_error(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 30)
    layers = _layers()
    cache.save(DIGEST, LAYOUT, layers)
    rec = cache.record(DIGEST, LAYOUT)
    wrong = torch.empty(3, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        cache.read_into(rec, [(0, "w13", 1, wrong)])


def test_the_bound_holds_least_recently_used_leave_first(tmp_path):
    one = sum(t.numel() * 2 for _, _, parts in _layers() for _, t in parts)
    cache = PackedCache(tmp_path, budget=2 * one + one // 2)  # room for two entries
    digests = ["sha256:" + c * 64 for c in "abc"]
    cache.save(digests[0], LAYOUT, _layers(0))
    cache.save(digests[1], LAYOUT, _layers(1))
    old = tmp_path / f"{cache.key(digests[1], LAYOUT)}.json"
    os.utime(old, ns=(1, 1))  # b used longest ago; a read just now
    assert _read_all(cache, cache.record(digests[0], LAYOUT), _layers(0)) is not None
    cache.save(digests[2], LAYOUT, _layers(2))
    assert cache.status()["bytes"] <= cache.budget and cache.status()["entries"] == 2
    assert cache.record(digests[1], LAYOUT) is None  # evicted
    assert cache.record(digests[0], LAYOUT) is not None and cache.record(digests[2], LAYOUT) is not None
    cache.configure(budget=one)  # shrinking the bound evicts at once
    assert cache.status()["entries"] == 1 and cache.status()["bytes"] <= one
    cache.configure(budget=0)  # off: nothing kept, nothing written
    assert cache.status()["entries"] == 0
    cache.save_later(digests[0], LAYOUT, _layers(0))
    cache.flush()
    assert cache.record(digests[0], LAYOUT) is None


def test_the_bound_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTLIB_PACKED_CACHE", "1MiB")
    assert PackedCache(tmp_path).budget == 1 << 20
    monkeypatch.setenv("EXPERTLIB_PACKED_CACHE", "0")
    assert PackedCache(tmp_path).budget == 0
    monkeypatch.setenv("EXPERTLIB_PACKED_CACHE", "lots")
    assert PackedCache(tmp_path).budget == 0  # not a size: off, with a warning
    monkeypatch.delenv("EXPERTLIB_PACKED_CACHE")
    assert 0 < PackedCache(tmp_path).budget <= 64 << 30


def test_background_writes_land_and_orphans_go(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 30)
    cache.save_later(DIGEST, LAYOUT, _layers())
    cache.flush()
    assert cache.record(DIGEST, LAYOUT) is not None and cache.written == 1
    orphan = tmp_path / ("f" * 64 + ".bin")
    orphan.write_bytes(b"x" * 10)  # a data file whose record was never written
    cache.configure(budget=1 << 30)
    assert not orphan.exists() and cache.record(DIGEST, LAYOUT) is not None


def test_a_process_that_leaves_it_alone_neither_reads_nor_writes_it(tmp_path):
    cache = PackedCache(tmp_path, budget=1 << 30)
    cache.save(DIGEST, LAYOUT, _layers())
    cache.enabled = False
    assert cache.record(DIGEST, LAYOUT) is None
    cache.save_later("sha256:" + "b" * 64, LAYOUT, _layers(1))
    cache.flush()
    assert cache.status()["entries"] == 1  # kept for other processes, nothing added
    cache.enabled = True
    assert cache.record(DIGEST, LAYOUT) is not None
