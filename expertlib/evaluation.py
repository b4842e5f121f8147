"""Evaluate a base and its expert sets on the user's own data (the training formats, jsonl).

Each record's last assistant turn is the reference answer; everything before it is the prompt.
Per model (the base, then each set):

- `exact_match`: the greedy answer equals the reference (whitespace-stripped);
- `contains`: the greedy answer contains the reference;
- `loss` / `perplexity`: mean negative log-likelihood (and its exp) of the answer tokens, the
  tokens training learns (every assistant turn and its end-of-turn EOS, `expertlib.esft.data`).

In process (transformers, each set applied in place and reverted), or through a running
`expertlib serve` (`url=`): the same token ids go to `/v1/completions` (greedy answers; `echo` +
`logprobs` with `max_tokens=0` for the loss), so a deployed model is measured exactly as served.

    result = evaluate_data("./base", "qa.jsonl", ["qa", "code@2"])
    result.rows()        # metric x (base, qa, code@2)
    result.to_dict()     # JSON form
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertlib.errors import DataError, EngineError
from expertlib.esft.data import IGNORE_INDEX, collate, encode_messages, pad_token_id, read_records
from expertlib.loading import OpenNamed, open_expert_set

METRICS = ("exact_match", "contains", "loss", "perplexity")
#: Tokens generated beyond the longest reference answer (room for an EOS or a stray space).
ANSWER_SLACK = 4


@dataclass(frozen=True)
class Item:
    """One record: the prompt (messages before the last answer), the answer, and the whole
    conversation's token ids with training labels (-100 off the answers)."""

    line: int
    prompt_ids: tuple[int, ...]
    answer: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _prompt_text(messages: list[dict[str, str]], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)  # encode_messages' plain layout


def load_items(
    path: str | Path, tokenizer, *, max_length: int = 2048, limit: int | None = None
) -> list[Item]:
    """The records of a jsonl file as evaluation items; DataError names a bad line."""
    where = str(path)
    items = []
    for n, messages in read_records(path)[:limit]:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError("record has no assistant answer to evaluate", path=where, line=n)
        try:
            prompt = _prompt_text(messages[:last], tokenizer)
            ids, labels = encode_messages(messages[: last + 1], tokenizer)
        except Exception as exc:  # the chat template (jinja) may refuse a conversation in many ways
            raise DataError(f"cannot tokenise this record: {exc}", path=where, line=n) from None
        if len(ids) > max_length:
            raise DataError(
                f"record has {len(ids)} tokens, more than max_length={max_length}",
                path=where,
                line=n,
                hint="raise --max-length",
            )
        prompt_ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        items.append(Item(n, prompt_ids, messages[last]["content"], tuple(ids), tuple(labels)))
    return items


# --- scoring ------------------------------------------------------------------------------------------


def _metrics(items: Sequence[Item], answers: Sequence[str], nll: float, tokens: int) -> dict[str, float]:
    exact = [a.strip() == it.answer.strip() for a, it in zip(answers, items, strict=True)]
    contains = [it.answer.strip() in a for a, it in zip(answers, items, strict=True)]
    loss = nll / max(tokens, 1)
    return {
        "exact_match": round(sum(exact) / len(items), 4),
        "contains": round(sum(contains) / len(items), 4),
        "loss": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 700.0)), 4),
    }


def _answer_positions(item: Item) -> list[int]:
    """Positions t >= 1 whose token is an answer token (predicted from the tokens before it)."""
    return [t for t in range(1, len(item.labels)) if item.labels[t] != IGNORE_INDEX]


class LocalScorer:
    """The base in transformers; sets applied in place (and reverted) one after another."""

    def __init__(self, base: str | Path, tokenizer, *, device: str = "auto", batch_size: int = 16):
        from expertlib.devices import resolve_device
        from expertlib.moe import load_model

        self.model = load_model(base, dtype=torch.float32).to(resolve_device(device)).eval()
        self.tok = tokenizer
        self.batch_size = batch_size

    def applied(self, expert_set):
        import contextlib

        from expertlib.apply import apply_expert_set

        return contextlib.nullcontext() if expert_set is None else apply_expert_set(self.model, expert_set)

    @torch.no_grad()
    def answers(self, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        pad = pad_token_id(self.tok)
        out = []
        for i in range(0, len(items), self.batch_size):
            batch = items[i : i + self.batch_size]
            width = max(len(it.prompt_ids) for it in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, it in enumerate(batch):  # left padding
                ids[b, width - len(it.prompt_ids) :] = torch.tensor(it.prompt_ids)
                mask[b, width - len(it.prompt_ids) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.model.device),
                attention_mask=mask.to(self.model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=self.tok.eos_token_id,
            )
            out += self.tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def answer_nll(self, items: Sequence[Item]) -> tuple[float, int]:
        from expertlib.esft.data import Sample

        total, count = 0.0, 0
        for i in range(0, len(items), self.batch_size):
            samples = [Sample(it.input_ids, it.labels) for it in items[i : i + self.batch_size]]
            batch = {k: v.to(self.model.device) for k, v in collate(samples, pad_token_id(self.tok)).items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, S-1, V)
            labels = batch["labels"][:, 1:]  # (B, S-1)
            keep = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, S-1)
            total -= float(picked[keep].sum())
            count += int(keep.sum())
        return total, count


class ServedScorer:
    """A running `expertlib serve`: the same token ids, over its OpenAI completions route."""

    def __init__(self, url: str, *, api_key: str | None = None, concurrency: int = 8, timeout: float = 600):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.concurrency = concurrency

    def base_name(self) -> str:
        cards = self._call("GET", "/v1/models")["data"]
        return next(c["id"] for c in cards if not c.get("parent"))

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(
                f"cannot reach the server at {self.http.base_url}: {exc}", hint="is it running?"
            ) from None
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not an OpenAI-shaped error
                message = r.text[:500]
            raise EngineError(f"the server answered {r.status_code}: {message}")
        return r.json()

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def answers(self, model: str, items: Sequence[Item], max_new_tokens: int) -> list[str]:
        def one(it: Item) -> str:
            body = {
                "model": model,
                "prompt": list(it.prompt_ids),
                "max_tokens": max_new_tokens,
                "temperature": 0,
            }
            return self._call("POST", "/v1/completions", body)["choices"][0]["text"]

        return self._map(one, items)

    def answer_nll(self, model: str, items: Sequence[Item]) -> tuple[float, int]:
        def one(it: Item) -> tuple[float, int]:
            body = {
                "model": model,
                "prompt": list(it.input_ids),
                "max_tokens": 0,
                "echo": True,
                "logprobs": 0,
            }
            lps = self._call("POST", "/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
            positions = _answer_positions(it)
            return -sum(lps[t] for t in positions), len(positions)

        parts = self._map(one, items)
        return sum(n for n, _ in parts), sum(c for _, c in parts)


# --- the evaluation -----------------------------------------------------------------------------------


@dataclass
class DataEvalResult:
    """Metrics (rows) for the base and each expert set (columns) on one data file."""

    data: str
    base: str
    columns: list[str]
    metrics: dict[str, dict[str, float]]  # column -> metric -> value
    n_samples: int
    answer_tokens: int
    url: str | None = None
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "data": self.data,
            "base": self.base,
            "url": self.url,
            "n_samples": self.n_samples,
            "answer_tokens": self.answer_tokens,
            "metrics": self.metrics,
        }
        if self.predictions:
            out["predictions"] = self.predictions
        return out

    def rows(self) -> list[list[str]]:
        return [[m, *(f"{self.metrics[c][m]:.4g}" for c in self.columns)] for m in METRICS]


def evaluate_data(
    base: str | Path,
    data: str | Path,
    expert_sets: Sequence[str | Path] = (),
    *,
    url: str | None = None,
    api_key: str | None = None,
    open_named: OpenNamed | None = None,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    max_length: int = 2048,
    device: str = "auto",
    keep_predictions: bool = False,
    progress: bool = False,
) -> DataEvalResult:
    """Exact match, contains, answer loss and perplexity of BASE and each set on `data`.

    In process, `expert_sets` are patch paths, or names that `open_named` opens (`expertlib eval`
    passes its registry's `open`: `task`, `task@3`); with `url` they are the server's model names (the base column is the server's base). BASE gives the
    tokenizer either way (a folder or a hub id in the local cache)."""
    from expertlib.esft.data import load_tokenizer

    tok = load_tokenizer(base)
    items = load_items(data, tok, max_length=max_length, limit=limit)
    budget = (
        max_new_tokens
        or max(len(tok(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + ANSWER_SLACK
    )
    columns, metrics, predictions = [], {}, {}
    answer_tokens = sum(len(_answer_positions(it)) for it in items)

    def record(column: str, answers: list[str], nll: float, count: int) -> None:
        columns.append(column)
        metrics[column] = _metrics(items, answers, nll, count)
        if keep_predictions:
            predictions[column] = answers

    labels = ["base", *(str(s) for s in expert_sets)]
    if url is not None:
        scorer = ServedScorer(url, api_key=api_key)
        names = [scorer.base_name(), *(str(s) for s in expert_sets)]
        for label, name in _progress(list(zip(labels, names, strict=True)), progress):
            record(label, scorer.answers(name, items, budget), *scorer.answer_nll(name, items))
    else:
        local = LocalScorer(base, tok, device=device)
        sets = [None, *(open_expert_set(s, open_named=open_named).expert_set for s in expert_sets)]
        for label, es in _progress(list(zip(labels, sets, strict=True)), progress):
            with local.applied(es):
                record(label, local.answers(items, budget), *local.answer_nll(items))
    return DataEvalResult(str(data), str(base), columns, metrics, len(items), answer_tokens, url, predictions)


def _progress(pairs: list, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="evaluating", unit="model", disable=not enabled)


def generate_answers(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 128, bar=None
) -> list[str]:
    """Greedy answers to user prompts (chat template, left padding, stops at EOS)."""
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    out: list[str] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
        if bar is not None:
            bar.update(len(new))
    model.train(was_training)
    return out
