"""The digests of a base checkpoint's experts are computed once and kept under the user cache dir:
a later process (a server's first load of a set) reads them instead of hashing the experts again,
and any change to the checkpoint's files makes them computed again from the new bytes."""

from __future__ import annotations

import os
import shutil

import pytest

from expertlib.checkpoint import BaseCheckpoint


@pytest.fixture
def base(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "base"
    shutil.copytree(tiny_model_dir("qwen2_moe"), path)
    return path


def _count_hashing(monkeypatch) -> list:
    hashed = []
    original = BaseCheckpoint.expert

    def expert(self, layer, e):
        hashed.append((layer, e))
        return original(self, layer, e)

    monkeypatch.setattr(BaseCheckpoint, "expert", expert)
    return hashed


def test_a_new_process_reads_the_digests_instead_of_hashing(base, monkeypatch):
    first = BaseCheckpoint(base)
    layer = first.moe_layers[0]
    want = {e: first.expert_digest(layer, e) for e in range(3)}
    assert first.digest_cache_file.is_file() and str(first.digest_cache_file).startswith(
        os.environ["EXPERTLIB_CACHE"]
    )
    hashed = _count_hashing(monkeypatch)
    again = BaseCheckpoint(base)  # as another process would
    assert {e: again.expert_digest(layer, e) for e in range(3)} == want
    assert hashed == []
    assert again.expert_digest(layer, 3) == first.expert(layer, 3).digest() and hashed == [
        (layer, 3),
        (layer, 3),
    ]


def test_a_changed_checkpoint_is_hashed_again(base, monkeypatch):
    """Other weights in the same file, even with its mtime set back, give another cache file and
    the digests of the new bytes (a set for the old weights is then refused)."""
    from safetensors.torch import load_file, save_file

    first = BaseCheckpoint(base)
    layer = first.moe_layers[0]
    old = first.expert_digest(layer, 0)
    (shard,) = sorted(base.glob("*.safetensors"))
    st = shard.stat()
    tensors = load_file(str(shard))
    key = next(k for k in tensors if f"layers.{layer}." in k and "experts" in k)
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: ctime still moves
    changed = BaseCheckpoint(base)
    assert changed.digest_cache_file != first.digest_cache_file
    hashed = _count_hashing(monkeypatch)
    assert changed.expert_digest(layer, 0) != old and hashed == [(layer, 0)]


def test_a_damaged_cache_line_is_computed_again(base, monkeypatch):
    first = BaseCheckpoint(base)
    layer = first.moe_layers[0]
    want = first.expert_digest(layer, 0)
    cache = first.digest_cache_file
    cache.write_text(cache.read_text().replace("]", "") + '[1, "x"\n')  # every line cut short
    hashed = _count_hashing(monkeypatch)
    assert BaseCheckpoint(base).expert_digest(layer, 0) == want and hashed == [(layer, 0)]


def test_no_cache_dir_is_no_error(base, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setenv("EXPERTLIB_CACHE", str(blocked))
    ckpt = BaseCheckpoint(base)
    layer = ckpt.moe_layers[0]
    assert ckpt.expert_digest(layer, 0) == ckpt.expert(layer, 0).digest()
