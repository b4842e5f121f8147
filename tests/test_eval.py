"""`expertlib eval` and the evaluation library: exact numbers on a tiny case, sets applied and reverted."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from expertlib.apply import extract_expert_set
from expertlib.cli.main import cli
from expertlib.demo import evaluate as ev
from expertlib.demo.base import TINY_CONFIG, build_demo_base
from expertlib.demo.tasks import get_task
from expertlib.moe import load_model, read_expert, write_expert
from expertlib.testing import make_tokenizer


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_demo_base(
        TINY_CONFIG, path=tmp_path_factory.mktemp("demo") / "base", progress=False, threads=1
    )


def test_accuracy_is_the_share_of_exact_matches(monkeypatch):
    answers = {ex.prompt: ex.answer for t in ("add", "copy") for ex in ev.eval_examples(t, n_eval=10)}

    def fake_generate(model, tok, prompts, **kw):
        # right on every second prompt, with surrounding whitespace that the scorer strips
        return [f" {answers[p]}\n" if i % 2 == 0 else answers[p] + "0" for i, p in enumerate(prompts)]

    monkeypatch.setattr(ev, "generate_answers", fake_generate)
    details: dict = {}
    acc = ev.evaluate_model(None, None, ["add", "copy"], n_eval=10, limit=4, progress=False, details=details)
    assert acc == {"add": 0.5, "copy": 0.5}
    assert [d["correct"] for d in details["add"]] == [True, False, True, False]


@pytest.mark.slow
def test_generation_is_batched_greedy_and_left_padded(tiny_base):
    model = load_model(tiny_base, dtype=torch.float32)
    tok = make_tokenizer()
    prompts = [ex.prompt for ex in get_task("copy").split(n_train=0, n_eval=6).eval]
    batched = ev.generate_answers(model, tok, prompts, max_new_tokens=10, batch_size=6)
    alone = [ev.generate_answers(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone
    assert tok.padding_side == "left"


@pytest.mark.slow
def test_eval_cli_base_and_expert_sets(tiny_base, tmp_path, monkeypatch):
    model = load_model(tiny_base, dtype=torch.float32)
    before = read_expert(model, 0, 1)
    # An identity set (the base's own experts) must score exactly like the base; a set with
    # random experts is applied for real (its answers change) and reverted afterwards.
    same = extract_expert_set(model, model, task="same", experts={0: [0, 1]})
    same.save(tmp_path / "same.safetensors")
    noisy = model
    gen = torch.Generator().manual_seed(0)
    for e in range(8):
        w = read_expert(model, 0, e).map(lambda t: torch.randn(t.shape, generator=gen) * 2.0)
        write_expert(noisy, 0, e, w)
    base_again = load_model(tiny_base, dtype=torch.float32)
    broken = extract_expert_set(noisy, base_again, task="broken", experts={0: list(range(8))})
    broken.save(tmp_path / "broken.safetensors")

    runner = CliRunner()
    args = [
        "eval",
        str(tiny_base),
        "-e",
        str(tmp_path / "same.safetensors"),
        "-e",
        str(tmp_path / "broken.safetensors"),
    ]
    res = runner.invoke(cli, [*args, "--tasks", "copy,upper", "--limit", "6", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{") :])
    cols = data["accuracy"]
    assert list(cols) == ["base", str(tmp_path / "same.safetensors"), str(tmp_path / "broken.safetensors")]
    assert cols["base"] == cols[str(tmp_path / "same.safetensors")]
    assert set(cols["base"]) == {"copy", "upper"} and data["tasks"]["copy"]["n_eval"] == 6
    assert all(0.0 <= v <= 1.0 for c in cols.values() for v in c.values())

    res = runner.invoke(cli, [*args[:4], "--tasks", "copy", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "exact-match accuracy" in res.output and "copy" in res.output

    # While a set is evaluated the model holds its experts; the base's come back afterwards.
    seen = []
    real = ev.evaluate_model

    def spy(model, *a, **k):
        seen.append((k["desc"], read_expert(model, 0, 1)))
        return real(model, *a, **k)

    monkeypatch.setattr(ev, "evaluate_model", spy)
    broken_path = str(tmp_path / "broken.safetensors")
    # twice: the second apply checks the base digests, so it fails unless the first was reverted
    ev.evaluate(tiny_base, [broken_path, broken_path], tasks=["copy"], limit=2, progress=False)
    assert [d for d, _ in seen] == ["base", broken_path, broken_path]
    assert seen[0][1].equal(before)
    assert seen[1][1].equal(broken.expert(0, 1)) and seen[2][1].equal(broken.expert(0, 1))


def test_eval_cli_help_has_an_example():
    res = CliRunner().invoke(cli, ["eval", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output
