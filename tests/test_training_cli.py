"""`expertlib score | select | train` end to end on a tiny model, through the click CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from expertlib.apply import apply_expert_set, changed_experts
from expertlib.cli.main import cli
from expertlib.moe import load_model
from expertlib.patch import ExpertSet


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "task.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in "abcdefgh"
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res


def test_score_select_train_apply(tmp_path, tiny_model_dir, data):
    base = tiny_model_dir("qwen2_moe")
    res = run("score", base, data, "--out", tmp_path / "s.json", "--budget", 100, "--answer-only", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["tokens_scored"] == 16  # 8 answers of 1 char + EOS: fewer than the budget
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["base"]["model_type"] == "qwen2_moe" and scores["data_digest"].startswith("sha256:")
    assert scores["count_prompt_tokens"] is False and len(scores["token"]["0"]) == 8
    res = run(
        "select",
        tmp_path / "s.json",
        "--score",
        "gate",
        "--top-p",
        0.3,
        "--out",
        tmp_path / "e.json",
        "--json",
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "e.json").read_text())
    assert set(cfg) == {"experts", "shared_experts", "non_expert_modules"} and set(cfg["experts"]) == {
        "0",
        "1",
    }
    out = tmp_path / "p.safetensors"
    res = run(
        "train",
        base,
        data,
        "--task",
        "say",
        "--experts",
        tmp_path / "e.json",
        "--steps",
        2,
        "--lr",
        1e-3,
        "--batch-size",
        4,
        "--out",
        out,
        "--json",
    )
    assert res.exit_code == 0, res.output
    es = ExpertSet.open(out)
    assert es.manifest.experts == {int(k): v for k, v in cfg["experts"].items()}
    assert es.manifest.provenance.steps == 2 and es.manifest.provenance.data_digest.startswith("sha256:")
    model = load_model(base)
    apply_expert_set(model, es)
    assert changed_experts(load_model(base), model) == es.manifest.experts


def test_train_scores_and_selects_itself(tmp_path, tiny_model_dir, data):
    base = tiny_model_dir("mixtral")
    out = tmp_path / "m.safetensors"
    res = run(
        "train",
        base,
        data,
        "--task",
        "say",
        "--score",
        "token",
        "--top-p",
        0.2,
        "--steps",
        1,
        "--holdout",
        0.25,
        "--out",
        out,
        "--json",
    )
    assert res.exit_code == 0, res.output
    p = ExpertSet.open(out).manifest.provenance
    assert (p.method, p.score_function, p.top_p) == ("esft-token", "token", 0.2)
    # train scores the positions that produce answers by default
    assert p.tokens_scored > 0 and p.count_prompt_tokens is False and p.final_eval_loss is not None
    assert p.trainable_params > 0 and set(p.extra["scores"]) == {"0", "1"}
    # the paper's count per layer (every token scored), what capped-wide fills to, is recorded
    assert set(p.extra["paper_count"]) == {"0", "1"} and all(n >= 1 for n in p.extra["paper_count"].values())


def test_python_api_trains_what_the_cli_trains(tmp_path, tiny_model_dir, data):
    """`train_esft` with its grouped settings and `expertlib train` with the same options: the same patch."""
    from expertlib.esft.pipeline import DataConfig, RuntimeConfig, SelectionConfig, train_esft
    from expertlib.esft.training import TrainConfig

    base = tiny_model_dir("qwen2_moe")
    res = run(
        "train", base, data, "--task", "say", "--score", "gate", "--top-p", 0.3, "--budget", 0, "--answer-only",
        "--steps", 2, "--lr", 1e-3, "--batch-size", 4, "--holdout", 0.25, "--device", "cpu",
        "--out", tmp_path / "cli.safetensors",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    es = train_esft(
        base,
        data,
        task="say",
        out=tmp_path / "api.safetensors",
        selection=SelectionConfig(score="gate", top_p=0.3, count_prompt_tokens=False),
        config=TrainConfig(steps=2, lr=1e-3, batch_size=4),
        data_config=DataConfig(holdout=0.25),
        runtime=RuntimeConfig(device="cpu", progress=False),
    )
    cli_es = ExpertSet.open(tmp_path / "cli.safetensors")
    assert (
        es.manifest.provenance.method == "esft-gate" and es.manifest.provenance.count_prompt_tokens is False
    )
    assert es.manifest.experts == cli_es.manifest.experts
    for name, t in cli_es.tensors.items():  # equal up to the summation order of multithreaded kernels
        torch.testing.assert_close(es.tensors[name], t, rtol=1e-5, atol=1e-6)


def test_pipeline_settings_refuse_unknown_fields():
    from pydantic import ValidationError

    from expertlib.esft.pipeline import DataConfig, RuntimeConfig, SelectionConfig

    for group, field in ((SelectionConfig, "topp"), (DataConfig, "max_len"), (RuntimeConfig, "gpu")):
        with pytest.raises(ValidationError, match=field):
            group(**{field: 1})


def test_bad_data_fails_cleanly(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    out = tmp_path / "x.safetensors"
    res = run("train", tiny_model_dir("qwen2_moe"), bad, "--task", "x", "--out", out)
    assert res.exit_code == 2 and "bad.jsonl:2:" in res.output and "bad JSON" in res.output
    assert list(tmp_path.iterdir()) == [bad]  # nothing half-written


def test_train_on_device_auto_prints_the_memory_plan(tmp_path, tiny_model_dir, data):
    base = tiny_model_dir("olmoe")
    out = tmp_path / "b.safetensors"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            str(base),
            str(data),
            "--task",
            "say",
            "--steps",
            "2",
            "--device",
            "auto",
            "--dtype",
            "bfloat16",
            "--gradient-checkpointing",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output + res.stderr
    # twice: an estimate before loading, the exact plan once the selection is known
    assert res.stderr.count("memory plan on cpu") == 2
    for part in ("base (frozen)", "trained experts", "gradients", "optimizer (AdamW)", "activations"):
        assert part in res.stderr
    assert "in bfloat16" in res.stderr and "in float32" in res.stderr and "checkpointed" in res.stderr
    es = ExpertSet.open(out)
    training = es.manifest.provenance.training
    assert (training["dtype"], training["master_dtype"], training["gradient_checkpointing"]) == (
        "bfloat16",
        "float32",
        True,
    )
    # the base was loaded in bf16, the patch keeps the stored dtype and the stored experts' digests
    model = load_model(base)
    apply_expert_set(model, es)
    assert changed_experts(load_model(base), model) == es.manifest.experts


def test_refuses_a_run_that_cannot_fit_before_loading(tmp_path, tiny_model_dir, data):
    out = tmp_path / "x.safetensors"
    res = run(
        "train", tiny_model_dir("qwen2_moe"), data, "--task", "x", "--batch-size", 10**8,
        "--max-length", 4096, "--device", "cpu", "--out", out,
    )  # fmt: skip
    assert res.exit_code != 0
    assert "training needs about" in res.output and "--gradient-checkpointing" in res.output
    assert not out.exists()


def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, tiny_model_dir, data):
    for cmd in (
        ["score", tiny_model_dir("qwen2_moe"), data, "--out", tmp_path / "s.json"],
        ["train", tiny_model_dir("qwen2_moe"), data, "--task", "x", "--out", tmp_path / "x.safetensors"],
        ["eval", tiny_model_dir("qwen2_moe"), "--tasks", "mul", "--limit", 1],
    ):
        res = run(*cmd, "--device", "cuda:0")
        assert res.exit_code != 0
        assert "CUDA is not available" in res.output and "--device cpu" in res.output


def test_train_from_a_set_trains_it_again(tmp_path, tiny_model_dir, data):
    """The manifest records every settings group that made the set (data settings too), and
    `train --from SET` reruns that training: the same selection, settings and experts."""
    base = tiny_model_dir("qwen2_moe")
    first = tmp_path / "first.safetensors"
    res = run(
        "train", base, data, "--task", "say", "--score", "gate", "--top-p", 0.3, "--steps", 2, "--lr", 1e-3,
        "--batch-size", 4, "--holdout", 0.25, "--max-length", 64, "--pack", "--keep", "none",
        "--device", "cpu", "--out", first,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    p = ExpertSet.open(first).manifest.provenance
    assert (p.data["max_length"], p.data["pack"], p.data["holdout"]) == (64, True, 0.25)
    assert (p.selection["score"], p.selection["top_p"], p.selection["keep"]) == ("gate", 0.3, ["none"])
    assert p.training["steps"] == 2 and p.training["lr"] == 1e-3

    again = tmp_path / "again.safetensors"
    res = run("train", "--from", first, "--device", "cpu", "--out", again)
    assert res.exit_code == 0, res.output
    a, b = ExpertSet.open(first).manifest, ExpertSet.open(again).manifest
    assert (b.task, b.experts) == (a.task, a.experts)
    for group in ("selection", "data", "training"):
        assert getattr(b.provenance, group) == getattr(a.provenance, group), group
    for name, t in ExpertSet.open(again).tensors.items():
        torch.testing.assert_close(ExpertSet.open(first).tensors[name], t, rtol=1e-5, atol=1e-6)

    # an option given replaces the recorded one; the rest stay
    res = run("train", "--from", first, "--steps", 3, "--device", "cpu", "--out", tmp_path / "c.safetensors")
    assert res.exit_code == 0, res.output
    c = ExpertSet.open(tmp_path / "c.safetensors").manifest.provenance
    assert c.training["steps"] == 3 and c.data == a.provenance.data and c.selection == a.provenance.selection
    # never over the set it reads
    res = run("train", "--from", first, "--out", first)
    assert res.exit_code == 2 and "--out" in res.output
