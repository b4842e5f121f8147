"""The registry commands through click's CliRunner: the newcomer's tour, errors, import-esft, help."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from expertlib.cli.main import cli
from expertlib.cli.registry import COMMANDS
from expertlib.constants import REGISTRY_ENV
from expertlib.identity import base_identity
from expertlib.moe import load_model, read_expert
from expertlib.registry import Registry
from expertlib.registry.testing import make_expert_set


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    folder = tiny_model_dir("qwen2_moe")
    return folder, load_model(folder, dtype="float32")


def scaled_patch(base, path, task, experts, factor):
    folder, model = base
    ident = base_identity(model, name=str(folder))
    es = make_expert_set(
        task,
        ident,
        experts,
        fill=lambda layer, e: read_expert(model, layer, e).map(lambda t: t * factor),
        base_digests={
            (layer, e): read_expert(model, layer, e).digest() for layer, ids in experts.items() for e in ids
        },
    )
    return es, es.save(path)


def run(args, root, ok=True):
    result = CliRunner().invoke(
        cli, [str(a) for a in args], env={REGISTRY_ENV: str(root)}, catch_exceptions=False
    )
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_newcomer_tour(base, tmp_path):
    folder, _ = base
    reg, mirror, back = tmp_path / "reg", tmp_path / "mirror", tmp_path / "back"
    _, math = scaled_patch(base, tmp_path / "math.safetensors", "math", {0: [0, 1, 2], 1: [3]}, 1.1)
    _, code = scaled_patch(base, tmp_path / "code.safetensors", "code", {0: [2, 3]}, 1.5)

    out = run(["publish", math, "--tag", "stable", "--base", folder], reg).output
    assert "published math@1 (latest, stable)" in out
    run(["publish", code], reg)
    listed = json.loads(run(["list", "--json"], reg).output)
    assert [(e["name"], e["version"], e["tags"]) for e in listed] == [
        ("code", 1, ["latest"]),
        ("math", 1, ["latest", "stable"]),
    ]
    assert "math@1" in run(["list"], reg).output
    shown = json.loads(run(["show", "math@stable", "--json"], reg).output)
    assert shown["manifest"]["experts"] == {"0": [0, 1, 2], "1": [3]}
    assert "layer 1" in run(["show", "math"], reg).output

    png = tmp_path / "diff.png"
    out = run(["diff", "math", "code", "--base", folder, "--plot", png], reg).output
    assert "Experts retrained per layer" in out and "heatmap written" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(run(["diff", "math", "code", "--base", folder, "--json"], reg).output)
    assert d["pairs"][0]["jaccard"] == pytest.approx(1 / 5)  # {0.2} shared of {0.0,0.1,0.2,0.3,1.3}
    assert d["sets"][1]["mean_moved"] == pytest.approx(0.5, rel=1e-5)

    run(["push", "math", mirror], reg)
    run(["push", "code", mirror], reg)
    out = run(["pull", mirror, "--json"], back).output
    assert sorted(json.loads(out)["copied"]) == ["code@1", "math@1"]
    digests = lambda root: [(e.name, e.version, e.digest) for e in Registry(root).list()]  # noqa: E731
    assert digests(back) == digests(reg) == digests(mirror)
    assert "all intact" in run(["verify"], back).output

    run(["tag", "math@1", "best"], back)
    assert json.loads(run(["show", "math@best", "--json"], back).output)["version"] == 1
    run(["tag", "math", "best", "--delete"], back)
    assert run(["show", "math@best"], back, ok=False).exit_code == 2
    assert "removed math@1" in run(["rm", "math@1"], back).output
    gc = json.loads(run(["gc", "--json"], back).output)
    assert len(gc["removed_blobs"]) == 1


def test_verify_exit_code_and_friendly_errors(base, tmp_path):
    reg = tmp_path / "reg"
    _, math = scaled_patch(base, tmp_path / "math.safetensors", "math", {0: [1]}, 1.1)
    run(["publish", math], reg)
    blob = Registry(reg).get_path("math")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    r = run(["verify"], reg, ok=False)
    assert r.exit_code == 1 and "DAMAGED" in r.output and "math@1" in r.output
    assert json.loads(run(["verify", "--json"], reg, ok=False).output)["ok"] is False

    r = run(["publish", math, "--task", "../evil"], reg, ok=False)
    assert r.exit_code == 2 and "error:" in r.output and "hint:" in r.output
    r = run(["show", "nothing"], reg, ok=False)
    assert r.exit_code == 2 and "published names: math" in r.output
    r = run(["rm", "math"], reg, ok=False)
    assert r.exit_code == 2 and "--all" in r.output
    r = run(["diff", "math"], reg, ok=False)
    assert r.exit_code == 2


def test_import_esft(base, tmp_path):
    from expertlib.esft.reference import export_esft

    folder, _ = base
    es, _ = scaled_patch(base, tmp_path / "x.safetensors", "x", {0: [4, 5], 1: [0]}, 1.2)
    adapter = export_esft(es, tmp_path / "adapter", folder)
    out = run(
        ["import-esft", adapter, "--base", folder, "--task", "legal", "--json"], tmp_path / "reg"
    ).output
    entry = json.loads(out)
    assert (entry["name"], entry["version"], entry["experts"]) == ("legal", 1, 3)
    stored = Registry(tmp_path / "reg").open("legal", verify=True)
    assert stored.manifest.provenance.method == "esft-reference"
    assert stored.expert(0, 4).equal(es.expert(0, 4))


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_command_has_help_with_an_example(cmd):
    r = CliRunner().invoke(cli, [cmd.name, "--help"])
    assert r.exit_code == 0 and "Example:" in r.output
