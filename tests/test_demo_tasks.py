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
    from expertlib.demo.tasks import DOMAIN_TASKS, PRETRAIN_TASKS

    assert len(SPECIALISED_TASKS) >= 3 and len(GENERAL_TASKS) >= 3 and len(DOMAIN_TASKS) >= 3
    assert PRETRAIN_TASKS == GENERAL_TASKS + DOMAIN_TASKS and not set(PRETRAIN_TASKS) & set(SPECIALISED_TASKS)
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
        if prompt.startswith("sum "):
            _, x, _, y = prompt.split(" ")
            assert answer == str(int(x) + int(y))
            continue
        if prompt.startswith(("end ", "close: ")):
            arg = prompt.split(" ", 1)[1]
            pairs = dict(zip("([{<", ")]}>", strict=True))
            assert answer == "".join(pairs[c] for c in reversed(arg)), prompt
            continue
        if prompt.startswith("cross "):  # ( closes with ], [ with ), { with >, < with }
            arg = prompt.split(" ", 1)[1]
            pairs = {"(": "]", "[": ")", "{": ">", "<": "}"}
            assert answer == "".join(pairs[c] for c in reversed(arg)), prompt
            continue
        if prompt.startswith("open "):  # the opening run that the closing run closes
            arg = prompt.split(" ", 1)[1]
            closing = dict(zip(")]}>", "([{<", strict=True))
            assert answer == "".join(closing[c] for c in reversed(arg)), prompt
            continue
        if prompt.startswith(("fill ", "swap ")):
            arg = prompt.split(" ", 1)[1]
            assert set(arg) <= {"#", "."}, prompt
            want = "#" * len(arg) if prompt.startswith("fill") else arg.translate(str.maketrans("#.", ".#"))
            assert answer == want, prompt
            continue
        op, arg = prompt.split(": ", 1)
        if op == "copy":
            assert answer == arg
        elif op == "reverse":
            assert answer == arg[::-1]
        elif op == "add":
            x, y = arg.split("+")
            assert answer == str(int(x) + int(y))
        elif op == "sub":
            x, y = arg.split("-")
            assert answer == str(int(x) - int(y)) and int(answer) >= 0
        elif op == "flip":
            assert set(arg) <= {"#", "."} and answer == "".join("#" if c == "." else "." for c in arg)
        elif op == "shout":
            assert answer == arg[::-1].upper()
        elif op == "mirror":
            assert answer == arg[::-1] and set(arg) <= {"#", "."}
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
    assert len(get_task("add").split(n_train=10, n_eval=1000).eval) == 100
    assert len(get_task("sum").split(n_train=10, n_eval=1000).eval) == 100
    assert len(get_task("sub").split(n_train=10, n_eval=1000).eval) == 55


def test_domains_have_their_own_vocabulary():
    from expertlib.demo.tasks import DEMO_TASKS, TASKS

    chars = {}
    from expertlib.demo.tasks import PRETRAIN_TASKS

    for t in PRETRAIN_TASKS:
        task = get_task(t)
        for ex in task.split(n_train=50, n_eval=5).train:
            arg = ex.prompt.split(": ", 1)[1]
            chars.setdefault(task.domain, set()).update(arg + ex.answer)
    assert set(chars) == {"words", "numbers", "patterns", "brackets"}
    names = sorted(chars)
    for i, a in enumerate(names):  # the domains' contents share no character
        for b in names[i + 1 :]:
            assert not chars[a] & chars[b], (a, b, chars[a] & chars[b])
    # each demo task adapts a pretrained domain that the general tasks do not use
    assert {TASKS[t].domain for t in GENERAL_TASKS} == {"words"}
    assert {TASKS[t].domain for t in DEMO_TASKS} == {"numbers", "patterns", "brackets"}
    assert set(DEMO_TASKS) <= set(SPECIALISED_TASKS)


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
