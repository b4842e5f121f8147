"""`expertlib eval --data`: a base and its expert sets on the user's own jsonl, side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from expertlib.cli.main import cli
from expertlib.errors import DataError
from expertlib.esft.data import collate, encode_messages
from expertlib.evaluation import evaluate_data, load_items

PROMPTS = ["2+2=", "abc", "hello", "xyz", "The cat", "def f("]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, a set that changes answers, and data whose answers are the set's own for the
    first half of the records (as if the set had learned them) and fixed strings for the rest."""
    from transformers import AutoTokenizer

    from expertlib.apply import apply_expert_set
    from expertlib.testing import make_tiny_model
    from expertlib.vllm_plugin.testing import random_expert_set

    root = tmp_path_factory.mktemp("eval-data")
    model = make_tiny_model("qwen2_moe", root / "base")
    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    es = random_expert_set(model, "qa", {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}, seed=3, scale=2.0)
    patch = es.save(root / "qa.safetensors")
    rows = []
    for i, prompt in enumerate(PROMPTS):
        if i < len(PROMPTS) // 2:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            with apply_expert_set(model, es):
                out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        else:
            answer = "42"
        rows.append({"prompt": prompt, "completion": answer})
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(root=root, base=root / "base", patch=patch, data=data, tok=tok, model=model, es=es, rows=rows)


def test_metrics_per_set_side_by_side(world):
    from expertlib.apply import apply_expert_set

    r = evaluate_data(
        world["base"], world["data"], [str(world["patch"])], max_new_tokens=4, keep_predictions=True
    )
    base, qa = r.metrics["base"], r.metrics[str(world["patch"])]
    assert r.columns == ["base", str(world["patch"])] and r.n_samples == len(PROMPTS)
    assert qa["exact_match"] >= 0.5 and base["exact_match"] < qa["exact_match"]  # the set's own answers
    preds = r.predictions[str(world["patch"])]
    assert qa["contains"] == sum(
        row["completion"].strip() in p for row, p in zip(world["rows"], preds, strict=True)
    ) / len(preds)
    # loss: the token-weighted mean NLL of the answer tokens = transformers' loss over one batch
    tok = world["tok"]
    samples = []
    for row in world["rows"]:
        ids, labels = encode_messages(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}],
            tok,
        )
        samples.append(
            type("S", (), {"input_ids": ids, "labels": labels, "__len__": lambda s: len(s.input_ids)})()
        )
    batch = collate(samples, tok.pad_token_id)
    with torch.no_grad():
        want_base = float(world["model"](**batch).loss)
        with apply_expert_set(world["model"], world["es"]):
            want_qa = float(world["model"](**batch).loss)
    assert base["loss"] == pytest.approx(want_base, abs=1e-3) and qa["loss"] == pytest.approx(
        want_qa, abs=1e-3
    )
    assert base["perplexity"] == pytest.approx(math.exp(base["loss"]), rel=1e-3)
    assert r.answer_tokens == int((batch["labels"][:, 1:] != -100).sum())


def test_cli_json_and_table(world):
    args = [
        "eval",
        str(world["base"]),
        "--data",
        str(world["data"]),
        "-e",
        str(world["patch"]),
        "--limit",
        "3",
    ]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert out["n_samples"] == 3 and set(out["metrics"]) == {"base", str(world["patch"])}
    assert set(out["metrics"]["base"]) == {"exact_match", "contains", "loss", "perplexity"}
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "perplexity" in res.output and "exact_match" in res.output


def test_records_without_an_answer_name_their_line(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="line 1|:1"):
        load_items(bad, world["tok"])
