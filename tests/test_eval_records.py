"""Evaluation results kept with the registry version they measure: storage, migration of an older
index, `expertlib eval --record`, and `list` / `show` printing the versions of one task side by side."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from click.testing import CliRunner
from test_registry_remotes import fake_hub  # noqa: F401 - the fixture

from expertlib.cli.main import cli
from expertlib.constants import REGISTRY_ENV
from expertlib.errors import InvalidNameError
from expertlib.registry import Registry
from expertlib.registry.evals import EvalRecord, accuracy_records, examples_digest, make_records
from expertlib.registry.testing import make_expert_set, tiny_base_identity

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def reg(tmp_path):
    reg = Registry(tmp_path / "reg")
    base = tiny_base_identity()
    for seed in (1, 2):  # sum@1, sum@2
        reg.publish(make_expert_set("sum", base, {0: [1, 2]}, seed=seed))
    reg.publish(make_expert_set("fill", base, {1: [0]}, seed=3))
    return reg


def run(args, root, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args], env={REGISTRY_ENV: str(root)})
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_scores_are_kept_per_version_and_listed_side_by_side(reg):
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.5}}, data_digests={"sum": DIGEST}))
    reg.record_evals("sum@2", make_records({"sum": {"exact_match": 1.0, "loss": 0.25}}, n={"sum": 50}))
    got = reg.evals("sum")
    assert [(r.task, r.metric, r.value) for r in got[reg.resolve("sum@1").ref]] == [
        ("sum", "exact_match", 0.5)
    ]
    v2 = got[reg.resolve("sum@2").ref]
    assert [(r.metric, r.value, r.n) for r in v2] == [("exact_match", 1.0, 50), ("loss", 0.25, 50)]
    # the same measurement again replaces its value; on other data it adds a row
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.75}}, data_digests={"sum": DIGEST}))
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.1}}))
    v1 = reg.evals("sum@1")[reg.resolve("sum@1").ref]
    assert sorted((r.value, r.data_digest) for r in v1) == [(0.1, ""), (0.75, DIGEST)]
    assert reg.evals("fill") == {reg.resolve("fill").ref: []}

    listed = json.loads(run(["list", "--json"], reg.root).output)
    assert {(e["name"], e["version"]): len(e["evals"]) for e in listed} == {
        ("fill", 1): 0,
        ("sum", 1): 2,
        ("sum", 2): 2,
    }
    table = run(["list"], reg.root).output
    assert "scores" in table and "sum exact_match 1" in table
    shown = run(["show", "sum@1"], reg.root).output
    assert "Evaluation results of sum" in shown and "sum@1 (this)" in shown and "sum@2" in shown
    assert "0.75" in shown and "0.25" in shown  # sum@2's loss shown beside sum@1's scores
    assert json.loads(run(["show", "sum@2", "--json"], reg.root).output)["evals"][0]["value"] == 1.0


def test_removing_a_version_removes_its_scores(reg):
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.5}}))
    reg.rm("sum@1")
    con = sqlite3.connect(reg.root / "index.db")
    assert con.execute("SELECT COUNT(*) FROM evals").fetchone()[0] == 0


def test_bad_scores_are_refused_and_nothing_is_stored(reg):
    with pytest.raises(InvalidNameError, match="not a valid label"):
        make_records({"<script>": {"exact_match": 1.0}})
    with pytest.raises(InvalidNameError, match="not finite"):
        make_records({"sum": {"loss": float("nan")}})
    with pytest.raises(ValueError, match="sha256"):
        EvalRecord(task="sum", metric="em", value=1.0, data_digest="md5:00")
    assert all(not v for v in reg.evals("sum").values())


def test_an_index_of_schema_1_gains_the_table_and_keeps_its_sets(reg):
    con = sqlite3.connect(reg.root / "index.db")
    con.execute("DROP TABLE evals")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    ro = Registry(reg.root, read_only=True)  # read-only: not migrated, no scores, no error
    assert all(v == [] for v in ro.evals("sum").values())
    again = Registry(reg.root)  # opened for writing: migrated
    assert [e.ref.version for e in again.list(name="sum")] == [1, 2]
    again.record_evals("sum", make_records({"sum": {"exact_match": 1.0}}))
    con = sqlite3.connect(reg.root / "index.db")
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"


def test_accuracy_records_digest_the_samples_they_were_measured_on():
    samples = {"sum": [{"prompt": "sum 1 2", "answer": "3"}, {"prompt": "sum 2 2", "answer": "4"}]}
    (r,) = accuracy_records({"sum": 0.5}, samples, source="demo")
    assert (r.task, r.metric, r.value, r.n, r.source) == ("sum", "exact_match", 0.5, 2, "demo")
    assert r.data_digest == examples_digest([("sum 1 2", "3"), ("sum 2 2", "4")])
    assert r.data_digest != examples_digest([("sum 1 2", "3")])


@pytest.mark.slow
def test_eval_record_stores_each_version_scores(tmp_path):
    from expertlib.apply import extract_expert_set
    from expertlib.demo.base import TINY_CONFIG, build_demo_base
    from expertlib.moe import load_model, read_expert, write_expert

    base = build_demo_base(TINY_CONFIG, path=tmp_path / "base", progress=False, threads=1)
    model = load_model(base, dtype=torch.float32)
    same = extract_expert_set(model, model, task="copyset", experts={0: [0, 1]})  # the base's experts
    gen = torch.Generator().manual_seed(0)
    for e in range(8):
        write_expert(model, 0, e, read_expert(model, 0, e).map(lambda t: torch.randn(t.shape, generator=gen)))
    broken = extract_expert_set(
        model, load_model(base, dtype=torch.float32), task="copyset", experts={0: list(range(8))}
    )
    root = tmp_path / "reg"
    run(["publish", same.save(tmp_path / "same.safetensors")], root)
    run(["publish", broken.save(tmp_path / "broken.safetensors")], root)

    args = ["eval", base, "--tasks", "copy", "--limit", "4", "--json"]
    res = run([*args, "-e", "copyset@1", "-e", "copyset", "--record"], root)
    acc = json.loads(res.output[res.output.index("{") :])["accuracy"]
    assert list(acc) == ["base", "copyset@1", "copyset@2"]  # `copyset` recorded as the version it named
    stored = Registry(root).evals("copyset")
    by_version = {ref.version: recs for ref, recs in stored.items()}
    assert [(r.task, r.metric, r.value, r.n) for r in by_version[1]] == [
        ("copy", "exact_match", acc["copyset@1"]["copy"], 4)
    ]
    assert by_version[2][0].value == acc["copyset@2"]["copy"]
    assert by_version[1][0].data_digest == by_version[2][0].data_digest.strip() != ""
    assert acc["copyset@1"]["copy"] == acc["base"]["copy"]  # identity set: the base's score

    res = run([*args, "-e", tmp_path / "same.safetensors", "--record"], root, ok=False)
    assert res.exit_code == 2 and "registry versions" in res.output


# --- scores travel with the version: push and pull through every kind of remote --------------------


def _scores(reg: Registry, ref: str) -> list[tuple[str, str, float, str]]:
    return [(r.task, r.metric, r.value, r.data_digest) for r in reg.evals(ref)[reg.resolve(ref).ref]]


@pytest.fixture
def scored(reg):
    reg.record_evals("sum@1", make_records({"sum": {"exact_match": 0.5}}, data_digests={"sum": DIGEST}))
    reg.record_evals("sum@2", make_records({"sum": {"exact_match": 1.0}, "copy": {"exact_match": 0.98}}))
    return reg


def _round_trip(scored, remote: str, tmp_path):
    """Push sum (every version) to `remote`, pull it into a fresh registry; then record a newer
    score upstream and push and pull again: the sets are already there, their scores follow."""
    scored.push("sum", remote)
    back = Registry(tmp_path / "back")
    back.pull(remote, ["sum"])
    for ref in ("sum@1", "sum@2"):
        assert _scores(back, ref) == _scores(scored, ref) != []
    scored.record_evals("sum@2", make_records({"sum": {"exact_match": 0.75}}))
    assert scored.push("sum", remote).present == ["sum@1", "sum@2"]
    assert back.pull(remote, ["sum"]).present == ["sum@1", "sum@2"]
    assert ("sum", "exact_match", 0.75, "") in _scores(back, "sum@2")
    assert _scores(back, "sum@2") == _scores(scored, "sum@2")
    return back


def test_scores_travel_with_a_folder_push_and_pull(scored, tmp_path):
    back = _round_trip(scored, str(tmp_path / "mirror"), tmp_path)
    assert _scores(Registry(tmp_path / "mirror"), "sum@1") == _scores(back, "sum@1")


def test_scores_travel_with_an_http_push_and_pull(scored, tmp_path):
    from test_registry_remotes import serve

    from expertlib.server.registry_app import registry_app

    served = Registry(tmp_path / "served")
    with serve(registry_app(served)) as url:
        _round_trip(scored, url + "/v1/registry", tmp_path)
    assert _scores(served, "sum@2") == _scores(scored, "sum@2")


def test_scores_travel_with_an_object_store_push_and_pull(scored, tmp_path):
    _round_trip(scored, (tmp_path / "bucket").as_uri(), tmp_path)


@pytest.mark.usefixtures("fake_hub")
def test_scores_travel_with_a_hub_push_and_pull(scored, tmp_path):
    scored.push("sum@2", "hf://me/sum")
    back = Registry(tmp_path / "back")
    back.pull("hf://me/sum")
    assert _scores(back, "sum@2") == _scores(scored, "sum@2") != []


def test_an_http_registry_refuses_bad_scores_and_keeps_none(scored, tmp_path):
    import httpx
    from test_registry_remotes import serve

    from expertlib.server.registry_app import registry_app

    with serve(registry_app(scored)) as url:
        good = {"task": "sum", "metric": "exact_match", "value": 1.0}
        for bad in ({**good, "task": "<script>"}, {**good, "value": "nan"}):
            r = httpx.post(f"{url}/v1/registry/evals", json={"ref": "sum@1", "records": [good, bad]})
            assert r.status_code == 400, r.text
        r = httpx.post(f"{url}/v1/registry/evals", json={"ref": "nope@1", "records": [good]})
        assert r.status_code == 404
    assert _scores(scored, "sum@1") == [("sum", "exact_match", 0.5, DIGEST)]
