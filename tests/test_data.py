"""Task data: record shapes, prompt masking, EOS, packing, and errors that name file and line."""

from __future__ import annotations

import json

import pytest

from expertlib.errors import DataError
from expertlib.esft.data import IGNORE_INDEX, collate, data_digest, load_samples, pack_samples, split_holdout
from expertlib.testing import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def decode_trained(tok, s):
    return tok.decode([t for t, y in zip(s.input_ids, s.labels, strict=True) if y != IGNORE_INDEX])


def test_messages_mask_prompt_and_train_answer_with_eos(tmp_path, tok):
    p = write(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    (s,) = load_samples(p, tok)
    assert tok.decode(list(s.input_ids)) == "<s>Q: hi\nA: yo</s>"
    assert decode_trained(tok, s) == "yo</s>"
    assert s.labels[-1] == tok.eos_token_id
    assert s.labels[: len("<s>Q: hi\nA: ") - 2] == (IGNORE_INDEX,) * (len("<s>Q: hi\nA: ") - 2)


def test_multi_turn_trains_every_answer_only(tmp_path, tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    (s,) = load_samples(write(tmp_path / "d.jsonl", [{"messages": msgs}]), tok)
    assert decode_trained(tok, s) == "b</s>d</s>"
    assert tok.decode(list(s.input_ids)) == tok.apply_chat_template(msgs, tokenize=False)


def test_prompt_completion_equals_two_message_chat(tmp_path, tok):
    a = load_samples(write(tmp_path / "a.jsonl", [{"prompt": "2+2", "completion": "4"}]), tok)
    chat = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    b = load_samples(write(tmp_path / "b.jsonl", [{"messages": chat}]), tok)
    assert a == [s.__class__(s2.input_ids, s2.labels, 1) for s, s2 in zip(a, b, strict=True)]


def test_plain_template_appends_eos(tmp_path, tok):
    (s,) = load_samples(
        write(tmp_path / "a.jsonl", [{"prompt": "x", "completion": "y"}]), tok, template="none"
    )
    assert tok.decode(list(s.input_ids)) == "x\ny</s>"
    assert decode_trained(tok, s) == "y</s>"


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], 2, "bad JSON"),
        ([{"prompt": "a"}], 1, "completion"),
        ([{"messages": [{"role": "user", "content": "a"}]}], 1, "no assistant"),
        ([{"messages": [{"role": "robot", "content": "a"}]}], 1, "role"),
        ([{"text": "a"}], 1, "unknown record shape"),
        ([[1, 2]], 1, "JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, tok, lines, line, words):
    p = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as ei:
        load_samples(p, tok)
    assert ei.value.line == line and ei.value.path == str(p)
    assert f"bad.jsonl:{line}:" in str(ei.value) and words in str(ei.value)


def test_empty_file_and_missing_file(tmp_path, tok):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_samples(p, tok)
    with pytest.raises(DataError, match="no such data file"):
        load_samples(tmp_path / "nope.jsonl", tok)


def test_too_long_error_truncate_skip(tmp_path, tok):
    p = write(
        tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a" * 50, "completion": "b"}]
    )
    with pytest.raises(DataError, match="more than max_length=20") as ei:
        load_samples(p, tok, max_length=20)
    assert ei.value.line == 2
    assert [len(s) for s in load_samples(p, tok, max_length=20, too_long="skip")] == [11]
    # truncation that cuts every answer token away is an error too, naming the line
    with pytest.raises(DataError, match="no answer tokens"):
        load_samples(p, tok, max_length=20, too_long="truncate")


def test_packing_rows_keep_labels(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "cd"}] * 5)
    plain = load_samples(p, tok)
    packed = load_samples(p, tok, max_length=16, pack=True)
    assert all(len(s) == 16 for s in packed[:-1])
    assert [t for s in packed for t in s.input_ids] == [t for s in plain for t in s.input_ids]
    assert [t for s in packed for t in s.labels] == [t for s in plain for t in s.labels]
    assert pack_samples(plain, 1000)[0].num_answer_tokens == sum(s.num_answer_tokens for s in plain)


def test_collate_pads_and_masks(tmp_path, tok):
    p = write(
        tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "abcd", "completion": "b"}]
    )
    a, b = load_samples(p, tok)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(b))
    assert batch["attention_mask"][0].sum() == len(a)
    assert (batch["labels"][0, len(a) :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, len(a) :] == tok.pad_token_id).all()


def test_digest_and_holdout(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", [{"prompt": str(i), "completion": "b"} for i in range(10)])
    assert data_digest(p).startswith("sha256:") and len(data_digest(p)) == 71
    samples = load_samples(p, tok)
    tr, ho = split_holdout(samples, 0.2, seed=1)
    assert len(ho) == 2 and len(tr) == 8 and not set(tr) & set(ho)
    assert split_holdout(samples, 0.2, seed=1) == (tr, ho)


def test_template_refusal_names_the_line(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, *ok["messages"]]}
    with pytest.raises(DataError, match="no system role") as ei:
        load_samples(write(tmp_path / "d.jsonl", [ok, bad]), tok)
    assert ei.value.line == 2
