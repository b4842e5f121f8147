"""The toy task suite: deterministic generators, correct answers and scorers, jsonl export."""

from __future__ import annotations

import json

import pytest

from expertlib.demo.tasks import (
    GENERAL_TASKS,
    SPECIALISED_TASKS,
    TASKS,
    exact_match,
    get_task,
    mixture,
    resolve_tasks,
    write_jsonl,
)
from expertlib.testing import make_tokenizer


def test_groups_are_disjoint_and_named():
    assert set(GENERAL_TASKS) & set(SPECIALISED_TASKS) == set()
    assert len(SPECIALISED_TASKS) >= 3 and len(GENERAL_TASKS) >= 5
    assert resolve_tasks(["specialised", "copy", "caesar"]) == [*SPECIALISED_TASKS, "copy"]
    with pytest.raises(KeyError, match="unknown task"):
        resolve_tasks(["nope"])


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_and_held_out(name):
    task = get_task(name)
    a = task.split(n_train=200, n_eval=40, seed=3)
    b = task.split(n_train=200, n_eval=40, seed=3)
    c = task.split(n_train=200, n_eval=40, seed=4)
    assert a == b
    assert a.train != c.train
    assert len(a.train) == 200 and len(a.eval) == 40
    eval_prompts = [ex.prompt for ex in a.eval]
    assert len(set(eval_prompts)) == len(eval_prompts)
    if not task.closed:
        assert not set(eval_prompts) & {ex.prompt for ex in a.train}


@pytest.mark.parametrize("name", list(TASKS))
def test_samples_fit_the_character_tokenizer(name):
    tok = make_tokenizer()
    for ex in get_task(name).split(n_train=50, n_eval=20).train:
        text = tok.apply_chat_template(ex.messages(), tokenize=False)
        assert 12 <= len(text) <= 48, text
        assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids


def test_answers_are_right():
    ans = {ex.prompt: ex.answer for t in TASKS for ex in get_task(t).split(n_train=300, n_eval=10).train}
    for prompt, answer in ans.items():
        op, arg = prompt.split(": ", 1)
        if op == "copy":
            assert answer == arg
        elif op == "reverse":
            assert answer == arg[::-1]
        elif op == "sort":
            assert answer == "".join(sorted(arg))
        elif op.startswith("count "):
            assert answer == str(arg.count(op[-1]))
        elif op == "add":
            x, y = arg.split("+")
            assert answer == str(int(x) + int(y))
        elif op == "upper":
            assert answer == arg.upper()
        elif op == "caesar":
            assert answer == "".join(chr((ord(ch) - 97 + 1) % 26 + 97) for ch in arg)
        elif op == "mul":
            x, y = arg.split("*")
            assert answer == str(int(x) * int(y))
        elif op == "bin":
            assert int(answer, 2) == int(arg)
        else:
            raise AssertionError(f"unchecked task prompt {prompt!r}")
    assert ans["caesar: xyz"] == "yza" if "caesar: xyz" in ans else True


def test_closed_tasks_eval_the_whole_table():
    assert len(get_task("mul").split(n_train=10, n_eval=1000).eval) == 100
    assert len(get_task("bin").split(n_train=10, n_eval=1000).eval) == 64


def test_exact_match_scorer():
    task = get_task("add")
    assert task.score("12", "12") == 1.0
    assert task.score(" 12 \n", "12") == 1.0
    assert task.score("12\n34", "12") == 1.0  # first line only
    assert task.score("123", "12") == 0.0
    assert task.score("", "12") == 0.0
    assert exact_match("abc", "ab") == 0.0


def test_jsonl_export_is_the_training_format(tmp_path):
    exs = mixture(["copy", "caesar"], 5, seed=1)
    assert len(exs) == 10 and {e.task for e in exs} == {"copy", "caesar"}
    path = write_jsonl(exs, tmp_path / "d" / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 10
    for row, ex in zip(rows, exs, strict=True):
        assert row == {
            "messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
        }
