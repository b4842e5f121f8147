"""Diff of expert sets: numbers checked on hand-built sets, distance from a real base checkpoint, plot."""

from __future__ import annotations

import pytest

from expertlib.errors import BaseMismatchError
from expertlib.identity import base_identity
from expertlib.moe import load_model, read_expert
from expertlib.registry import Registry
from expertlib.registry.diff import diff_expert_sets, plot_diff, rel_diff
from expertlib.registry.testing import make_expert_set, tiny_base_identity


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    folder = tiny_model_dir("qwen2_moe")
    model = load_model(folder, dtype="float32")
    return folder, model, base_identity(model, name=str(folder))


def scaled(model, ident, task, experts, factor):
    """A set whose experts are the base's times `factor` (so every distance is known exactly)."""
    digests = {
        (layer, e): read_expert(model, layer, e).digest() for layer, ids in experts.items() for e in ids
    }
    return make_expert_set(
        task,
        ident,
        experts,
        fill=lambda layer, e: read_expert(model, layer, e).map(lambda t: t * factor),
        base_digests=digests,
    )


def test_rel_diff_by_hand():
    import torch

    from expertlib.moe import ExpertWeights

    a = ExpertWeights(gate=torch.ones(2, 2), up=torch.zeros(2, 2), down=torch.zeros(2, 2))
    b = ExpertWeights(gate=torch.full((2, 2), 2.0), up=torch.zeros(2, 2), down=torch.zeros(2, 2))
    assert rel_diff(a, b) == pytest.approx(0.5)  # ||1 - 2|| / ||2||
    assert rel_diff(b, a) == pytest.approx(1.0)
    assert rel_diff(a, a) == 0.0


def test_diff_numbers(base):
    folder, model, ident = base
    a = scaled(model, ident, "a", {0: [0, 1, 2], 1: [4]}, 1.1)
    b = scaled(model, ident, "b", {0: [1, 2, 3]}, 1.5)
    c = scaled(model, ident, "c", {1: [4, 5]}, -1.0)
    r = diff_expert_sets([a, b, c], ["a@1", "b@1", "c@1"], base_dir=folder)
    assert r.labels == ["a@1", "b@1", "c@1"] and r.num_experts == 8 and r.moe_layers == [0, 1]
    l0, l1 = r.layers
    assert l0.experts == {"a@1": [0, 1, 2], "b@1": [1, 2, 3], "c@1": []}
    assert l0.shared == [] and l0.jaccard == 0.0  # c touches nothing in layer 0
    assert l1.experts == {"a@1": [4], "b@1": [], "c@1": [4, 5]}
    ab, ac, bc = r.pairs
    assert (ab.a, ab.b, ab.shared_experts, ab.union_experts) == ("a@1", "b@1", 2, 5)
    assert ab.jaccard == pytest.approx(2 / 5)
    assert [(d.layer, d.expert) for d in ab.rel_diff] == [(0, 1), (0, 2)]
    for d in ab.rel_diff:
        assert d.rel_diff == pytest.approx(0.4 / 1.5, rel=1e-5)
    assert ac.jaccard == pytest.approx(1 / 5) and ac.rel_diff[0].rel_diff == pytest.approx(2.1, rel=1e-5)
    assert bc.jaccard == 0.0 and bc.rel_diff == [] and bc.mean_rel_diff is None
    assert sum(r.overlap_matrix, []) == pytest.approx([1, 0.4, 0.2, 0.4, 1, 0, 0.2, 0, 1])
    sa, sb, sc = r.sets
    assert sa.mean_moved == pytest.approx(0.1, rel=1e-5) and len(sa.moved) == 4
    assert sb.max_moved == pytest.approx(0.5, rel=1e-5)
    assert sc.mean_moved == pytest.approx(2.0, rel=1e-5)
    assert sa.fraction_of_routed == pytest.approx(4 / 16) and sb.num_experts == 3 and sb.layers == 1
    assert r.notes == []


def test_two_sets_per_layer_jaccard_and_no_base(base):
    folder, model, ident = base
    a = scaled(model, ident, "a", {0: [0, 1, 2]}, 1.1)
    b = scaled(model, ident, "b", {0: [1, 2, 3]}, 1.5)
    r = diff_expert_sets([a, b])
    assert r.layers[0].shared == [1, 2] and r.layers[0].jaccard == pytest.approx(0.5)
    assert r.sets[0].moved is None and r.num_experts is None
    assert any("--base" in n for n in r.notes)


def test_diff_refuses_wrong_base(base, tiny_model_dir):
    folder, model, ident = base
    a = scaled(model, ident, "a", {0: [0]}, 1.1)
    fake = make_expert_set("fake", ident, {0: [0]}, hidden=64, inter=32)  # made-up base digests
    with pytest.raises(BaseMismatchError, match="not the base expert"):
        diff_expert_sets([a, fake], base_dir=folder)
    with pytest.raises(BaseMismatchError):
        diff_expert_sets([a, a], base_dir=tiny_model_dir("mixtral"))
    other = make_expert_set("o", tiny_base_identity("mixtral"), {0: [0]}, inter=64)
    with pytest.raises(BaseMismatchError, match="another base"):
        diff_expert_sets([a, other])


def test_fused_checkpoint_arch_with_biases(tiny_model_dir):
    """gpt_oss stores experts fused (and with biases) on disk: the distance still comes out right."""
    folder = tiny_model_dir("gpt_oss")
    model = load_model(folder, dtype="float32")
    ident = base_identity(model, name=str(folder))
    a = scaled(model, ident, "a", {0: [0, 1]}, 1.25)
    b = scaled(model, ident, "b", {0: [1]}, 0.5)
    assert a.expert(0, 1).down_bias is not None
    r = diff_expert_sets([a, b], base_dir=folder)
    assert r.sets[0].mean_moved == pytest.approx(0.25, rel=1e-5)
    assert r.sets[1].mean_moved == pytest.approx(0.5, rel=1e-5)
    assert r.pairs[0].jaccard == pytest.approx(0.5) and r.pairs[0].rel_diff[0].rel_diff == pytest.approx(
        1.5, rel=1e-5
    )
    assert r.notes == []


def test_plot_is_a_png_and_registry_diff(base, tmp_path):
    import matplotlib.image

    folder, model, ident = base
    reg = Registry(tmp_path / "reg")
    reg.publish(scaled(model, ident, "math", {0: [0, 1, 2], 1: [4]}, 1.1))
    reg.publish(scaled(model, ident, "math", {0: [1, 2, 3]}, 1.5))
    reg.publish(scaled(model, ident, "code", {1: [4, 5, 7]}, 0.9))
    r = reg.diff(["math@1", "math@2", "code"], base_dir=folder)
    assert r.labels == ["math@1", "math@2", "code@1"]
    assert r.sets[2].mean_moved == pytest.approx(0.1, rel=1e-5)
    out = plot_diff(r, tmp_path / "overlap.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # cells of different set combinations get different colours: the image is not blank
    assert len({tuple(px) for px in img.reshape(-1, img.shape[2])[::97]}) > 4
