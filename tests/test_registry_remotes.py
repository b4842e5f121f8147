"""Push and pull: another registry folder, an HTTP registry on a real port, the Hub (faked at the transfer)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from server_process import ServerThread

from expertlib.errors import DigestMismatchError, InvalidNameError, NotFoundError, RemoteError
from expertlib.registry import Registry
from expertlib.registry.testing import tiny_base_identity, write_expert_set

BASE = tiny_base_identity()


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.fixture
def src(tmp_path) -> Registry:
    """math@1 (stable), math@3 (math@2 removed: a gap), code@1."""
    reg = Registry(tmp_path / "src")
    for i, (task, experts) in enumerate(
        [("math", {0: [1]}), ("math", {0: [2]}), ("math", {0: [3]}), ("code", {1: [5]})]
    ):
        reg.publish(
            write_expert_set(tmp_path / f"p{i}.safetensors", task, BASE, experts, seed=i),
            tags=["stable"] if i == 0 else (),
        )
    reg.rm("math@2")
    return reg


def refs_digests(reg: Registry) -> list[tuple[str, str, list[str]]]:
    return [(str(e.ref), e.digest, e.tags) for e in reg.list()]


# --- folder ----------------------------------------------------------------------------------------


def test_folder_push_and_pull_back_keep_digests_versions_tags(src, tmp_path):
    r = src.push("math", str(tmp_path / "mirror"))
    assert r.copied == ["math@1", "math@3"] and r.tags == ["math@stable"]
    mirror = Registry(tmp_path / "mirror")
    assert refs_digests(mirror) == [x for x in refs_digests(src) if x[0].startswith("math")]
    assert src.push("math", str(tmp_path / "mirror")).present == ["math@1", "math@3"]
    src.push("code@1", str(tmp_path / "mirror"))
    back = Registry(tmp_path / "back")
    r = back.pull(str(tmp_path / "mirror"))
    assert sorted(r.copied) == ["code@1", "math@1", "math@3"]
    assert refs_digests(back) == refs_digests(src)
    assert back.verify().ok
    assert back.resolve("math@1").source.endswith("#math@1")
    assert back.pull(str(tmp_path / "mirror"), ["math@stable"]).present == ["math@1"]


def test_pull_refuses_a_corrupt_source_blob(src, tmp_path):
    corrupt(src.get_path("math@1"))
    dest = Registry(tmp_path / "dest")
    with pytest.raises(DigestMismatchError, match="math@1"):
        dest.pull(str(src.root), ["math@1"])
    assert dest.list() == [] and list(dest.blobs.iter_digests()) == []
    assert dest.pull(str(src.root), ["math@3"]).copied == ["math@3"]


def test_remote_urls(tmp_path):
    (tmp_path / "notareg").mkdir()
    (tmp_path / "notareg" / "file.txt").write_text("x")
    reg = Registry(tmp_path / "r")
    with pytest.raises(RemoteError, match="not an expertlib registry"):
        reg.pull(str(tmp_path / "notareg"))
    with pytest.raises(InvalidNameError):
        reg.pull("ftp://host/x")
    with pytest.raises(InvalidNameError):
        reg.pull("hf://a/../b")
    with pytest.raises(NotFoundError, match="no expertlib registry"):
        reg.pull(str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()  # a pull never creates its source


# --- HTTP --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(app):
    """Run `app` with uvicorn on a free 127.0.0.1 port; yields the base URL."""
    with ServerThread(app, lifespan="off") as server:
        yield server.url


@pytest.fixture
def http_remote(tmp_path):
    """A registry served over HTTP on a real port; yields (registry, url)."""
    from expertlib.server.registry_app import registry_app

    reg = Registry(tmp_path / "served")
    with serve(registry_app(reg)) as url:
        yield reg, url + "/v1/registry"


def test_token_protected_registry_app(src, tmp_path):
    from expertlib.server.registry_app import registry_app

    served = Registry(tmp_path / "served")
    with serve(registry_app(served, token="s3cret")) as url:
        with pytest.raises(RemoteError, match="401"):
            src.push("math@1", url + "/v1/registry")
        with pytest.raises(RemoteError, match="401"):
            src.push("math@1", url + "/v1/registry", token="wrong")
        assert src.push("math@1", url + "/v1/registry", token="s3cret").copied == ["math@1"]
    assert [str(e.ref) for e in served.list()] == ["math@1"]


def test_http_push_list_pull(src, http_remote, tmp_path):
    served, url = http_remote
    r = src.push("math", url)
    assert r.copied == ["math@1", "math@3"] and r.dest == url
    assert refs_digests(served) == [x for x in refs_digests(src) if x[0].startswith("math")]
    assert src.push("math", url).present == ["math@1", "math@3"]
    back = Registry(tmp_path / "back")
    r = back.pull(url, ["math@stable"])
    assert r.copied == ["math@1"]
    back.pull(url)
    assert refs_digests(back) == refs_digests(served)
    with pytest.raises(NotFoundError, match="holds no expert set matching nope"):
        back.pull(url, ["nope"])


def test_http_pull_detects_corrupt_blob_and_server_refuses_wrong_bytes(src, http_remote, tmp_path):
    from expertlib.registry.client import HttpRemote

    served, url = http_remote
    src.push("math@1", url)
    corrupt(served.get_path("math@1"))
    back = Registry(tmp_path / "back")
    with pytest.raises(DigestMismatchError):
        back.pull(url, ["math@1"])
    assert back.list() == [] and list(back.blobs.tmp_dir.iterdir()) == []
    # an upload whose bytes do not hash to the announced digest is refused by the server
    entry = src.resolve("code@1").model_copy(update={"digest": "sha256:" + "0" * 64})
    with pytest.raises(RemoteError, match="400"):
        HttpRemote(url).put(entry, src.get_path("code@1"), [])
    assert [str(e.ref) for e in served.list()] == ["math@1"]
    with pytest.raises(RemoteError, match="cannot reach"):
        back.pull("http://127.0.0.1:9/v1/registry")


def test_router_finds_the_expertlib_server_registry(src):
    """Mounted in the expertlib server, the routes use app.state.server.registry."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from expertlib.server.registry_routes import router

    app = FastAPI()
    app.state.server = SimpleNamespace(registry=src)
    app.include_router(router, prefix="/admin/registry")
    with TestClient(app) as client:
        body = client.get("/admin/registry/entries", params={"name": "math"}).json()
        assert [(e["name"], e["version"]) for e in body["entries"]] == [("math", 1), ("math", 3)]
        e = client.get("/admin/registry/entries/math@stable").json()
        assert e["version"] == 1 and e["manifest"]["task"] == "math"
        blob = client.get(f"/admin/registry/blobs/{e['digest']}")
        assert blob.content == src.get_path("math@1").read_bytes()


# --- Hugging Face Hub (the transfer itself is faked: tests cannot reach the Hub) ------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HfApi.create_repo / create_commit and hf_hub_download served from a local folder."""
    import huggingface_hub as hfh
    from huggingface_hub import errors as hf_errors

    root = tmp_path / "hub"
    commits: list[tuple[str, str, str | None]] = []

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kw):
        assert repo_type == "model" and exist_ok
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, repo_type=None, **kw):
        assert (root / repo_id).is_dir(), "create_repo first"
        for op in operations:
            with op.as_file() as f:
                (root / repo_id / op.path_in_repo).write_bytes(f.read())
        commits.append((repo_id, commit_message, revision))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(commits)}")

    def hf_hub_download(repo_id, filename, *, revision=None, token=None, **kw):
        if not (root / repo_id).is_dir():
            import httpx

            resp = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}"))
            raise hf_errors.RepositoryNotFoundError(f"{repo_id} not found", response=resp)
        path = root / repo_id / filename
        if not path.is_file():
            raise hf_errors.EntryNotFoundError(f"{filename} not found")
        cached = tmp_path / "hf-cache" / repo_id / filename
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, cached)
        return str(cached)

    monkeypatch.setattr(hfh.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hfh.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(hfh, "hf_hub_download", hf_hub_download)
    return SimpleNamespace(root=root, commits=commits)


def test_hub_push_writes_patch_manifest_and_card(src, fake_hub):
    r = src.push("math", "hf://me/tiny-math")
    assert r.copied == ["math@3"] and r.url == "https://huggingface.co/me/tiny-math/commit/1"
    repo = fake_hub.root / "me/tiny-math"
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "expert_set.safetensors", "expertlib.json"]
    assert (repo / "expert_set.safetensors").read_bytes() == src.get_path("math@3").read_bytes()
    meta = json.loads((repo / "expertlib.json").read_text())
    assert (meta["name"], meta["version"], meta["digest"]) == ("math", 3, src.resolve("math@3").digest)
    assert meta["manifest"]["task"] == "math" and meta["base"]["config_digest"] == BASE.config_digest
    card = (repo / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: expertlib\n" in card and meta["digest"] in card
    assert "expertlib pull hf://me/tiny-math" in card and "| 0 | 3 |" in card
    assert "math@3" in fake_hub.commits[0][1]
    src.push("math@stable", "hf://me/tiny-math")  # a second commit updates the repo
    assert json.loads((repo / "expertlib.json").read_text())["version"] == 1 and len(fake_hub.commits) == 2


def test_hub_pull_verifies_digest_before_import(src, fake_hub, tmp_path):
    src.push("math@3", "hf://me/tiny-math")
    dest = Registry(tmp_path / "dest")
    r = dest.pull("hf://me/tiny-math@main")
    assert r.copied == ["math@3"]
    assert dest.resolve("math").digest == src.resolve("math@3").digest
    assert dest.resolve("math").source == "hf://me/tiny-math@main"
    assert dest.pull("hf://me/tiny-math").present == ["math@3"]
    # a repo whose patch does not match its manifest's digest is refused, nothing enters
    src.push("code", "hf://me/tiny-code")
    corrupt(fake_hub.root / "me/tiny-code/expert_set.safetensors")
    with pytest.raises(DigestMismatchError, match="nothing was imported"):
        dest.pull("hf://me/tiny-code")
    assert [str(e.ref) for e in dest.list()] == ["math@3"]
    with pytest.raises(NotFoundError, match="no Hub repo"):
        dest.pull("hf://me/missing")
    (fake_hub.root / "me/plain").mkdir(parents=True)
    with pytest.raises(NotFoundError, match="expertlib.json"):
        dest.pull("hf://me/plain")


def test_hub_card_has_the_hub_metadata_and_the_recorded_scores(tmp_path, fake_hub):
    from huggingface_hub import ModelCard

    from expertlib.registry.evals import make_records, retention_records

    reg = Registry(tmp_path / "hubcard")
    base = tiny_base_identity(name="someone/tiny-moe")  # a Hub id: the card links it as base_model
    reg.publish(write_expert_set(tmp_path / "s.safetensors", "sum", base, {0: [1, 4], 2: [3]}, seed=7))
    digest = "sha256:" + "cd" * 32
    reg.record_evals("sum", make_records({"sum": {"exact_match": 0.96}}, data_digests={"sum": digest}))
    reg.record_evals("sum", retention_records({"mean_general_mass": 0.02, "max_general_mass": 0.05}))
    reg.push("sum", "hf://me/tiny-sum")

    card = ModelCard.load(fake_hub.root / "me/tiny-sum/README.md", ignore_metadata_errors=False)
    data = card.data
    assert data.library_name == "expertlib" and data.base_model == "someone/tiny-moe"
    assert {"expertlib", "esft", "mixture-of-experts"} <= set(data.tags)
    (result,) = data.eval_results  # model-index: the scores, not the retention check
    assert (result.dataset_name, result.metric_type, result.metric_value) == ("sum", "exact_match", 0.96)
    block = data.to_dict()["expertlib"]
    assert block["experts_replaced"] == {0: [1, 4], 2: [3]} and block["num_experts"] == 3
    assert block["digest"] == reg.resolve("sum").digest
    assert [e["data_digest"] for e in block["evaluations"] if e["task"] == "sum"] == [digest]
    assert "| sum | exact_match | 0.96 |" in card.text and "mean_general_mass" in card.text

    dest = Registry(tmp_path / "back")
    dest.pull("hf://me/tiny-sum")  # the set comes back unchanged
    assert dest.get_path("sum").read_bytes() == reg.get_path("sum").read_bytes()
    assert dest.show("sum").manifest == reg.show("sum").manifest
