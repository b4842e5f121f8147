"""Expert-set patch format: round trips, apply/revert, extraction, and every bad input refused."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from expertlib.apply import apply_expert_set, changed_experts, extract_expert_set
from expertlib.constants import MANIFEST_METADATA_KEY
from expertlib.errors import (
    BaseMismatchError,
    DigestMismatchError,
    PatchCorruptError,
    PatchFormatError,
    PatchShapeError,
    PatchVersionError,
)
from expertlib.moe import load_model, moe_layer_indices, read_expert, write_expert
from expertlib.patch import ExpertSet, read_header


def _tuned(model, experts, scale=0.5, seed=1):
    """A copy of `model` whose listed experts got a large random change."""
    import copy

    g = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    for layer, ids in experts.items():
        for e in ids:
            w = read_expert(model, layer, e)
            write_expert(tuned, layer, e, w.map(lambda t: t + scale * torch.randn(t.shape, generator=g)))
    return tuned


@pytest.fixture
def qwen(tiny_model_dir):
    return load_model(tiny_model_dir("qwen2_moe"))


@pytest.fixture
def patch_file(qwen, tmp_path):
    tuned = _tuned(qwen, {0: [1, 4], 1: [2]})
    es = extract_expert_set(tuned, qwen, task="math")
    return es.save(tmp_path / "math.safetensors"), tuned


def test_roundtrip_every_arch(arch, tiny_model_dir, tmp_path):
    base = load_model(tiny_model_dir(arch))
    layers = moe_layer_indices(base)
    experts = {layers[0]: [0, 5], layers[-1]: [7]}
    tuned = _tuned(base, experts)
    es = extract_expert_set(tuned, base, task="t", experts=experts)
    path = es.save(tmp_path / "t.safetensors")
    again = ExpertSet.open(path)
    again.verify()
    assert again.manifest.experts == {layers[0]: [0, 5], layers[-1]: [7]}
    for (layer, e), w in again.experts():
        assert w.equal(read_expert(tuned, layer, e))
    # apply -> logits equal the tuned model, differ from the base; revert -> bit-exact base
    x = torch.randint(4, 90, (2, 10))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with torch.no_grad():
        base_logits = base(x).logits
        with apply_expert_set(base, again):
            assert torch.equal(base(x).logits, tuned(x).logits)
            assert not torch.allclose(base(x).logits, base_logits)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_manifest_readable_without_tensors(patch_file):
    path, _ = patch_file
    manifest, header = read_header(path)
    assert manifest.task == "math" and manifest.experts == {0: [1, 4], 1: [2]}
    assert manifest.dtype == "float32" and manifest.expert_shapes["gate"] == [32, 64]
    assert set(header) == {
        f"layers.{lay}.experts.{e}.{p}" for lay, e in [(0, 1), (0, 4), (1, 2)] for p in ("gate", "up", "down")
    }
    es = ExpertSet.open(path)
    assert es._tensors is None  # nothing loaded yet
    assert es.nbytes == path.stat().st_size


def test_extract_finds_changed_experts(qwen, patch_file):
    _, tuned = patch_file
    assert changed_experts(qwen, tuned) == {0: [1, 4], 1: [2]}
    assert changed_experts(qwen, qwen) == {}
    with pytest.raises(PatchShapeError, match="no routed expert differs"):
        extract_expert_set(qwen, qwen, task="x")


def test_truncated_file_refused(patch_file, tmp_path):
    path, _ = patch_file
    data = path.read_bytes()
    for cut in (4, 100, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PatchCorruptError, match="truncated|too short"):
            ExpertSet.open(bad)


def test_altered_bytes_fail_digest(patch_file, tmp_path):
    path, _ = patch_file
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    es = ExpertSet.open(bad)  # header intact: opens
    with pytest.raises(DigestMismatchError, match="altered or damaged"):
        es.verify()


def test_patch_for_another_base_refused(patch_file, tiny_model_dir):
    path, _ = patch_file
    other_weights = load_model(tiny_model_dir("qwen2_moe", seed=1))  # same config, other weights
    with pytest.raises(BaseMismatchError, match="same architecture and config, other weights"):
        apply_expert_set(other_weights, ExpertSet.open(path))
    other_arch = load_model(tiny_model_dir("qwen3_moe"))
    with pytest.raises(BaseMismatchError, match="was made for a qwen2_moe base"):
        apply_expert_set(other_arch, ExpertSet.open(path))


def test_second_apply_without_revert_refused(qwen, patch_file):
    path, _ = patch_file
    es = ExpertSet.open(path)
    handle = apply_expert_set(qwen, es)
    with pytest.raises(BaseMismatchError):
        apply_expert_set(qwen, es)
    handle.revert()
    apply_expert_set(qwen, es).revert()


def _rewrite(path, out, mutate_manifest=None, mutate_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    manifest = json.loads(meta[MANIFEST_METADATA_KEY])
    if mutate_manifest:
        mutate_manifest(manifest)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(out), metadata={MANIFEST_METADATA_KEY: json.dumps(manifest)})
    return out


def test_wrong_shape_refused(patch_file, tmp_path):
    path, _ = patch_file

    def shrink(t):
        t["layers.0.experts.1.gate"] = t["layers.0.experts.1.gate"][:, :-1].contiguous()

    with pytest.raises(PatchShapeError, match="shape"):
        ExpertSet.open(_rewrite(path, tmp_path / "s.safetensors", mutate_tensors=shrink))


def test_wrong_dtype_refused(patch_file, tmp_path):
    path, _ = patch_file

    def half(t):
        t["layers.1.experts.2.down"] = t["layers.1.experts.2.down"].half()

    with pytest.raises(PatchShapeError, match="dtype float16"):
        ExpertSet.open(_rewrite(path, tmp_path / "d.safetensors", mutate_tensors=half))


def test_unknown_and_missing_keys_refused(patch_file, tmp_path):
    path, _ = patch_file
    with pytest.raises(PatchShapeError, match="unknown"):
        ExpertSet.open(
            _rewrite(path, tmp_path / "u.safetensors", mutate_tensors=lambda t: t.update(evil=torch.ones(1)))
        )
    with pytest.raises(PatchShapeError, match="missing"):
        ExpertSet.open(
            _rewrite(
                path, tmp_path / "m.safetensors", mutate_tensors=lambda t: t.pop("layers.0.experts.4.up")
            )
        )


def test_ids_out_of_range_refused(patch_file, qwen, tmp_path):
    path, _ = patch_file

    def rename(m):
        m["experts"] = {"0": [1, 40], "1": [2]}
        m["expert_digests"]["0.40"] = m["expert_digests"].pop("0.4")
        m["base_expert_digests"]["0.40"] = m["base_expert_digests"].pop("0.4")

    def rekey(t):
        for p in ("gate", "up", "down"):
            t[f"layers.0.experts.40.{p}"] = t.pop(f"layers.0.experts.4.{p}")

    bad = ExpertSet.open(_rewrite(path, tmp_path / "r.safetensors", rename, rekey))
    with pytest.raises(PatchShapeError, match=r"expert ids \[40\] out of range"):
        apply_expert_set(qwen, bad)

    def bad_layer(m):
        m["experts"] = {"7": m["experts"].pop("0"), "1": [2]}

    with pytest.raises(PatchShapeError):
        ExpertSet.open(_rewrite(path, tmp_path / "l.safetensors", bad_layer))


def test_pickle_refused_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PatchFormatError, match="never unpickles"):
        ExpertSet.open(p)
    z = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, z)
    with pytest.raises(PatchFormatError, match="pickle or PyTorch zip"):
        ExpertSet.open(z)


def test_plain_safetensors_without_manifest_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    with pytest.raises(PatchFormatError, match="without an expertlib manifest"):
        ExpertSet.open(p)


def test_newer_format_version_refused(patch_file, tmp_path):
    path, _ = patch_file
    bad = _rewrite(path, tmp_path / "v.safetensors", lambda m: m.update(format_version=99))
    with pytest.raises(PatchVersionError, match="upgrade expertlib"):
        ExpertSet.open(bad)


def test_garbage_header_refused(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"[1,2]")
    with pytest.raises(PatchFormatError):
        ExpertSet.open(p)


def test_save_is_atomic_no_temp_left(patch_file):
    path, _ = patch_file
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
