"""Task data for ESFT scoring and training: jsonl in, token ids and labels out.

Two record shapes are accepted, one JSON object per line:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}

The first is the reference ESFT format. A prompt/completion record is the two-message chat
`[user: prompt, assistant: completion]`. Text is rendered with the tokenizer's chat template
(or plain concatenation when it has none, or with `template="none"`). Every token that is not
part of an assistant answer gets the label -100 (`IGNORE_INDEX`); answers and the end-of-turn
EOS are trained.

    samples = load_samples("task.jsonl", tokenizer, max_length=512)
    batch = collate(samples[:8], pad_id=tokenizer.pad_token_id)   # input_ids, attention_mask, labels

Malformed data raises `DataError` naming the file and the (1-based) line.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from expertlib.errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

TooLong = Literal["error", "truncate", "skip"]


@dataclass(frozen=True)
class Sample:
    """One tokenised training sequence. `labels[t] == input_ids[t]` where trained, else -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    line: int = 0  # 1-based source line (0 for packed rows)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def data_digest(path: str | Path) -> str:
    """sha256 of the data file's bytes, as recorded in scores and patch provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- records ----------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """Parse a jsonl file into (line number, messages) pairs, validating every record."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError("no such data file", path=where, hint="pass a .jsonl file with one record per line")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            records.append((n, _parse_line(raw, where, n)))
    if not records:
        raise DataError("the data file has no records", path=where, hint=_SHAPES)
    return records


def _parse_line(raw: str | bytes, where: str, n: int) -> list[dict[str, str]]:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        msg = (
            f"bad JSON: {exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
        )
        raise DataError(msg, path=where, line=n, hint=_SHAPES) from None
    return _messages(obj, where, n)


_SHAPES = 'each line must be {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}'


def _messages(obj: Any, where: str, n: int) -> list[dict[str, str]]:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=where, line=n, hint=_SHAPES)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError('"messages" must be a non-empty list', path=where, line=n, hint=_SHAPES)
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"message {i} needs 'role' and 'content'", path=where, line=n, hint=_SHAPES)
            if m["role"] not in ROLES or not isinstance(m["content"], str):
                raise DataError(
                    f"message {i}: role must be one of {ROLES} and content a string (got role {m['role']!r})",
                    path=where,
                    line=n,
                )
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise DataError("no assistant message: nothing to train on", path=where, line=n, hint=_SHAPES)
        return out
    if "prompt" in obj or "completion" in obj:
        missing = [k for k in ("prompt", "completion") if not isinstance(obj.get(k), str)]
        if missing:
            raise DataError(f"missing or non-string field(s) {missing}", path=where, line=n, hint=_SHAPES)
        return [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["completion"]},
        ]
    raise DataError(f"unknown record shape with keys {sorted(obj)}", path=where, line=n, hint=_SHAPES)


# --- tokenisation -----------------------------------------------------------------------------------


def encode_messages(
    messages: list[dict[str, str]], tokenizer, *, template: Literal["auto", "none"] = "auto"
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: assistant answers (+ EOS) trained, the rest -100.

    The conversation is cut into segments by rendering growing prefixes with the chat template
    (prompt up to each assistant turn with the generation prompt, then the turn itself); each
    segment is tokenised on its own. An EOS is appended to an answer segment that does not already
    contain the tokenizer's EOS.
    """
    eos = tokenizer.eos_token_id
    segments: list[tuple[str, bool]] = []
    if template == "auto" and getattr(tokenizer, "chat_template", None):

        def render(msgs, gen=False) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        cursor = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = render(messages[:i], gen=True), render(messages[: i + 1])
            if not (prompt.startswith(cursor) and full.startswith(prompt)):
                raise ValueError(
                    "the chat template does not render conversations as growing prefixes; "
                    "use template='none' (plain prompt + answer) for this tokenizer"
                )
            segments += [(prompt[len(cursor) :], False), (full[len(prompt) :], True)]
            cursor = full
        rest = render(messages)
        segments.append((rest[len(cursor) :] if rest.startswith(cursor) else "", False))
    else:
        for m in messages:
            text = m["content"] if m["role"] == "assistant" else m["content"] + "\n"
            segments.append((text, m["role"] == "assistant"))
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        if not text and not trained:
            continue
        seg = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if trained and eos is not None and eos not in seg:
            seg.append(eos)
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return ids, labels


def load_samples(
    path: str | Path,
    tokenizer,
    *,
    max_length: int = 2048,
    too_long: TooLong = "error",
    template: Literal["auto", "none"] = "auto",
    pack: bool = False,
) -> list[Sample]:
    """Read, validate and tokenise a jsonl file.

    `too_long`: a sample longer than `max_length` tokens is an error (default, naming its line),
    is cut to `max_length`, or is skipped. With `pack`, samples are concatenated (labels kept)
    and cut into rows of exactly `max_length` tokens (the last row may be shorter); attention
    then crosses sample boundaries inside a row, as in the usual packed LM training.
    """
    where = str(path)
    samples = []
    for n, messages in read_records(path):
        s = _to_sample(messages, tokenizer, where, n, max_length, None if pack else too_long, template)
        if s is not None:
            samples.append(s)
    if not samples:
        raise DataError(f"no sample fits max_length={max_length}", path=where, hint="raise --max-length")
    return pack_samples(samples, max_length) if pack else samples


def _to_sample(
    messages: list[dict[str, str]],
    tokenizer,
    where: str,
    n: int,
    max_length: int,
    too_long: TooLong | None,
    template: Literal["auto", "none"],
) -> Sample | None:
    """Tokenise one record; None when `too_long="skip"` drops it (`too_long=None`: never cut)."""
    try:
        ids, labels = encode_messages(messages, tokenizer, template=template)
    except Exception as exc:  # the chat template (jinja) may refuse a conversation in many ways
        raise DataError(f"cannot tokenise this record: {exc}", path=where, line=n) from None
    if too_long is not None and len(ids) > max_length:
        if too_long == "error":
            raise DataError(
                f"sample has {len(ids)} tokens, more than max_length={max_length}",
                path=where,
                line=n,
                hint="raise --max-length, or pass --too-long truncate / skip",
            )
        if too_long == "skip":
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    if not any(x != IGNORE_INDEX for x in labels):
        raise DataError("sample has no answer tokens after tokenisation", path=where, line=n)
    return Sample(tuple(ids), tuple(labels), n)


class LazySamples(Sequence):
    """The samples of a jsonl file, read and tokenised on access (`samples[i]`).

    Holds one byte offset and line number per record, never the text or the tokens, so a pass
    over it (streaming scoring) needs memory independent of the file's size. An item is None
    when `too_long="skip"` drops that record; errors name the file and line as `load_samples`.
    """

    def __init__(
        self,
        path: str | Path,
        tokenizer,
        *,
        max_length: int = 2048,
        too_long: TooLong = "truncate",
        template: Literal["auto", "none"] = "auto",
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                "no such data file", path=str(path), hint="pass a .jsonl file with one record per line"
            )
        self.tokenizer, self.max_length, self.too_long, self.template = (
            tokenizer,
            max_length,
            too_long,
            template,
        )
        self._offsets, self._lines = array("q"), array("q")
        pos = 0
        with open(self.path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    self._offsets.append(pos)
                    self._lines.append(n)
                pos += len(raw)
        if not self._offsets:
            raise DataError("the data file has no records", path=str(path), hint=_SHAPES)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            raw = f.readline()
        n = int(self._lines[i])
        messages = _parse_line(raw, str(self.path), n)
        return _to_sample(
            messages, self.tokenizer, str(self.path), n, self.max_length, self.too_long, self.template
        )


def pack_samples(samples: Sequence[Sample], max_length: int) -> list[Sample]:
    """Concatenate samples and cut the stream into rows of `max_length` tokens."""
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    rows = []
    for i in range(0, len(ids), max_length):
        row = Sample(tuple(ids[i : i + max_length]), tuple(labels[i : i + max_length]), 0)
        if row.num_answer_tokens:
            rows.append(row)
    return rows


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (B, S), attention_mask (B, S), labels (B, S) with -100 on padding."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS (padding is masked out everywhere anyway)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token", hint="set tokenizer.pad_token")
    return int(pad)


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic (seeded) split into (train, held-out); held-out gets round(fraction * n), >= 1 if fraction > 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(samples)
    k = 0 if fraction == 0 else max(1, round(fraction * n))
    if k >= n:
        raise DataError(
            f"{n} samples are too few to hold out {fraction:.0%} for evaluation", hint="pass more data"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    held = set(order[:k])
    return [s for i, s in enumerate(samples) if i not in held], [
        s for i, s in enumerate(samples) if i in held
    ]


def load_tokenizer(base: str | Path):
    """The base model's tokenizer (from its folder or hub id)."""
    from transformers import AutoTokenizer

    from expertlib.errors import ModelLoadError

    try:
        return AutoTokenizer.from_pretrained(str(base))
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(
            f"cannot load a tokenizer from {str(base)!r}: {exc}",
            hint="the base folder needs its tokenizer files",
        ) from exc
