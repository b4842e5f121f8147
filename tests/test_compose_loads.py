"""One way to open a set and one load transaction (`expertlib.loading`), run by the transformers
composer and the engines' book alike: the same refusals, in the same order, and nothing resident
changes when a load is refused."""

from __future__ import annotations

import copy

import pytest

from expertlib.errors import (
    BaseMismatchError,
    NotFoundError,
    PatchShapeError,
    SlotError,
    WeightBoundError,
)
from expertlib.loading import OpenedSet, open_expert_set


class _Workers:
    """collective_rpc's stand-in: every call succeeds at once."""

    async def __call__(self, method: str, args: tuple = ()) -> list:
        return [True] if method == "expertlib_stage" else [{"hits": 0, "paths": []}]


class _BookLoader:
    """The engines' book, loading as `ExpertEngine.load` does (its workers stood in for)."""

    def __init__(self, base_dir, model, slots: int, max_sets: int):
        from expertlib.bounds import WeightBounds, model_absmax
        from expertlib.checkpoint import BaseCheckpoint
        from expertlib.engine.book import SetBook

        self.book = SetBook(BaseCheckpoint(base_dir), slots, max_sets)
        self.book.bounds = WeightBounds(model_absmax(model))  # what the workers report at start
        self.ledger = self.book

    def load(self, es, name=None, *, pin=False, open_named=None):
        from expertlib.engine.offline import _run_now

        opened = self.book.open(open_expert_set(es, name=name, open_named=open_named))
        return _run_now(self.book.load(opened, pin, _Workers()))

    def loaded(self):
        return self.book.pool.loaded()


def _loader(kind: str, base_dir, slots: int = 4, max_sets: int = 2):
    from expertlib.compose import ComposedModel
    from expertlib.moe import load_model

    model = load_model(base_dir)
    if kind == "compose":
        return ComposedModel(model, slots=slots, max_sets=max_sets)
    return _BookLoader(base_dir, model, slots, max_sets)


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    from expertlib.apply import extract_expert_set
    from expertlib.moe import load_model, moe_layer_indices, read_expert, write_expert
    from expertlib.vllm_plugin.testing import random_expert_set

    base_dir = tiny_model_dir("qwen2_moe")
    model = load_model(base_dir)
    layers = moe_layer_indices(model)
    root = tmp_path_factory.mktemp("sets")
    sets = {
        name: random_expert_set(model, name, {layer: experts for layer in layers}, seed=i).save(
            root / f"{name}.safetensors"
        )
        for i, (name, experts) in enumerate([("a", [0, 1]), ("b", [2, 3]), ("c", [4, 5])])
    }
    huge = random_expert_set(model, "huge", {layers[0]: [6]}, seed=9, scale=1e4)
    sets["huge"] = huge.save(root / "huge.safetensors")
    tuned = copy.deepcopy(model)
    w = read_expert(model, layers[0], 7)
    write_expert(tuned, layers[0], 7, w.map(lambda t: t * 1.5))
    norm = next(n for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    full = extract_expert_set(tuned, model, task="full", experts={layers[0]: [7]}, extra_param_names=[norm])
    sets["full"] = full.save(root / "full.safetensors")
    other = load_model(tiny_model_dir("qwen2_moe", seed=3))
    foreign = random_expert_set(other, "foreign", {layers[0]: [0]}, seed=4)
    sets["foreign"] = foreign.save(root / "foreign.safetensors")
    return base_dir, sets


BACKENDS = ["compose", "engine"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_set_with_full_parameters_is_refused_by_both(world, kind):
    """The composer used to load such a set's experts and drop its full parameters without a word."""
    base_dir, sets = world
    loader = _loader(kind, base_dir)
    with pytest.raises(PatchShapeError, match="carries full parameters") as err:
        loader.load(sets["full"])
    assert "apply" in err.value.hint
    assert loader.loaded() == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_another_set_under_a_loaded_name_is_refused_by_both(world, kind):
    """The composer used to answer with the old set's name, keeping the old set, as if it had loaded
    the new one; both now refuse, and the resident set stays as it was."""
    base_dir, sets = world
    loader = _loader(kind, base_dir)
    from expertlib.patch import ExpertSet

    assert loader.load(sets["a"]) == "a"
    with pytest.raises(SlotError, match="another expert set is loaded as 'a'") as err:
        loader.load(sets["b"], "a")
    assert "unload 'a' first" in err.value.hint
    assert loader.loaded() == ["a"]
    assert loader.ledger.sets["a"].digest == ExpertSet.open(sets["a"]).manifest.content_digest
    # the same set again is only touched, and pinned when asked
    assert loader.load(sets["a"], pin=True) == "a"
    assert loader.ledger.pool.status()["sets"]["a"]["pinned"] is True


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_checks_run_in_order_and_before_anything_is_evicted(world, kind):
    """Full parameters before the base, the base before verify, weight bounds before any eviction: a
    full pool keeps its sets when the new one is refused."""
    base_dir, sets = world
    loader = _loader(kind, base_dir, slots=4, max_sets=2)
    loader.load(sets["a"])
    loader.load(sets["b"])
    with pytest.raises(BaseMismatchError):
        loader.load(sets["foreign"])
    with pytest.raises(WeightBoundError):
        loader.load(sets["huge"])  # would need an eviction: none happened
    assert loader.loaded() == ["a", "b"]
    assert loader.load(sets["c"]) == "c" and loader.loaded() == ["b", "c"]  # a real load evicts


def test_open_expert_set_takes_files_sets_and_names(world, tmp_path):
    from expertlib.patch import ExpertSet

    _, sets = world
    opened = open_expert_set(sets["a"])
    assert opened.name == "a" and opened.version is None and opened.expert_set.path == sets["a"]
    es = ExpertSet.open(sets["b"])
    assert open_expert_set(es, name="bee") == OpenedSet(es, "bee")
    assert open_expert_set(OpenedSet(es, "b", 3)).version == 3
    asked = []

    def open_named(ref: str):
        asked.append(ref)
        return OpenedSet(ExpertSet.open(sets["c"]), "c@2", 2)

    got = open_expert_set("c@2", open_named=open_named)
    assert asked == ["c@2"] and (got.name, got.version) == ("c@2", 2)
    with pytest.raises(NotFoundError, match="no expert set file") as err:
        open_expert_set("c@2")  # a name, and nobody to open names
    assert "registry" in err.value.hint
    with pytest.raises(NotFoundError, match="no expert set file"):
        open_expert_set(tmp_path / "missing.safetensors", open_named=open_named)  # a path stays a path
    assert asked == ["c@2"]
