"""What an ESFT run keeps: reference data for retention-aware selection, and the after-training fit check.

`--keep DATA` names data whose skills the trained set must not take away; selection then avoids
the experts that carry it (`expertlib.esft.selection.keep_layer`). A source is

- a jsonl file (the training format; e.g. a slice of the base's pretraining or chat mix);
- `builtin`: the general data the base ships (`expertlib.esft.base_data`; the demo base's general tasks);
- `self`: prompts and greedy answers sampled from the base itself, generated once per base and
  cached (`self_samples`): real bases ship no general data, so this is what they keep by default;
- `auto` (the default): `builtin` on a base that ships general data (the demo base), `self` on any other;
- `none`: keep nothing (the paper's selection).

    sources = resolve_keep(["auto"], base, model, tokenizer)     # [KeptData(name, digest, samples)]
    shares = [kept_routing(model, k.samples, pad_id=pad) for k in sources]

After training, `fit_check` measures, with the set applied, how many training and held-out
samples the set answers exactly (teacher-forced), decodes a small sample of them greedily (as
the set will be used: one wrong token derails the rest of a long answer, which teacher forcing
never sees), and says when the set falls short of what the data asks and why (`FitReport.message`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from expertlib.errors import DataError
from expertlib.esft.data import IGNORE_INDEX, Sample, collate, load_samples

#: `--keep` values that are not files.
AUTO, SELF, NONE = "auto", "self", "none"
#: Prompts the base writes for itself (`self_samples`), and the tokens of each prompt and answer.
SELF_SAMPLES, SELF_PROMPT_TOKENS, SELF_ANSWER_TOKENS = 64, 32, 48
#: Below this teacher-forced exact match, `fit_check` says the set falls short.
SHORT_EXACT = 0.9
#: Answers longer than this (mean tokens) are judged on token accuracy instead of exact match.
LONG_ANSWER_TOKENS = 32
#: `fit_check` decodes this many prompts greedily (held-out ones when there are any), and at most
#: this many answer tokens of each: a bounded cost, whatever the data.
GREEDY_SAMPLES, GREEDY_MAX_TOKENS = 32, 256


@dataclass
class KeptData:
    """One `--keep` source resolved: its name as given, what it was, a digest, its samples."""

    name: str
    kind: str  # file, builtin, self
    digest: str
    samples: list[Sample]


def ships_general_data(base: str | Path) -> bool:
    from expertlib.esft.base_data import GENERAL, reference_files

    return bool(reference_files(base, GENERAL))


def resolve_keep(
    sources: Sequence[str | Path], base: str | Path, model: nn.Module, tokenizer, *, max_length: int = 2048
) -> list[KeptData]:
    """The kept datasets of `--keep` values (module docstring); `none` alone (or nothing) keeps nothing."""
    from expertlib.esft.data import data_digest
    from expertlib.esft.diagnostics import BUILTIN_GENERAL, builtin_general_samples

    names = [str(s) for s in sources]
    if NONE in names and len(names) > 1:
        raise DataError("--keep none cannot be combined with other --keep data", hint="drop one of them")
    out: list[KeptData] = []
    for name in names:
        if name == NONE:
            continue
        kind = (BUILTIN_GENERAL if ships_general_data(base) else SELF) if name == AUTO else name
        if kind == BUILTIN_GENERAL:
            samples = builtin_general_samples(base, tokenizer, max_length=max_length)
            out.append(KeptData(name, BUILTIN_GENERAL, _samples_digest(samples), samples))
        elif kind == SELF:
            path = self_samples(model, tokenizer)
            out.append(
                KeptData(
                    name,
                    SELF,
                    data_digest(path),
                    load_samples(path, tokenizer, max_length=max_length, too_long="truncate"),
                )
            )
        else:
            samples = load_samples(name, tokenizer, max_length=max_length, too_long="truncate")
            out.append(KeptData(name, "file", data_digest(name), samples))
    return out


def _samples_digest(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.input_ids, s.labels]).encode())
    return "sha256:" + h.hexdigest()


def kept_routing(model: nn.Module, samples: Sequence[Sample], *, pad_id: int) -> dict[int, list[float]]:
    """Routing shares of kept data where its answers are produced (the retention check's statistic)."""
    from expertlib.esft.diagnostics import routing_shares

    return routing_shares(model, samples, pad_id=pad_id, token_budget=20_000, count_prompt_tokens=False)


# --- the base's own samples ---------------------------------------------------------------------


def base_digest(model: nn.Module) -> str:
    """A short digest naming the base's weights: its structural config and input embedding."""
    from expertlib.identity import base_identity
    from expertlib.moe import tensor_digest

    emb = model.get_input_embeddings().weight
    blob = f"{base_identity(model).config_digest}/{tensor_digest(emb)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pre_query(tokenizer) -> tuple[str, str]:
    """(text before the user's words, text after them) in the chat template; ('', '') without one."""
    marker = "\x00KEEP\x00"
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before, _, after = text.partition(marker)
    return before, after


@torch.no_grad()
def self_samples(
    model: nn.Module,
    tokenizer,
    *,
    n: int = SELF_SAMPLES,
    seed: int = 0,
    cache: str | Path | None = None,
) -> Path:
    """A jsonl of `n` prompts the base writes itself and its greedy answers, cached per base.

    The prompt is sampled (temperature 1) from the chat template's text before a user's words,
    as Magpie (Xu et al. 2024) draws instructions from aligned models; the answer is the base's
    greedy reply. What the base does unprompted is the best stand-in for its general use when
    no general data is given. Written once per base digest under `$EXPERTLIB_CACHE/keep/`.
    """
    from expertlib.fsutil import cache_dir

    path = Path(cache) if cache else cache_dir() / "keep" / f"self-{base_digest(model)}-{n}-{seed}.jsonl"
    if path.is_file():
        return path
    before, after = _pre_query(tokenizer)
    end = after.strip() or None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = tokenizer(before or (tokenizer.bos_token or ""), add_special_tokens=not before).input_ids
    if not start:
        start = [tokenizer.eos_token_id]
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ids = torch.tensor([start] * n, device=device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=SELF_PROMPT_TOKENS,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                pad_token_id=pad,
            )
        prompts = []
        for text in tokenizer.batch_decode(gen[:, len(start) :], skip_special_tokens=True):
            text = (text.split(end, 1)[0] if end else text).strip()
            if text:
                prompts.append(text)
        if not prompts:
            raise DataError(
                "the base wrote no prompts to keep (every sample was empty)",
                hint="pass --keep with data of what the base must keep doing (e.g. a slice of its training mix)",
            )
        from expertlib.evaluation import generate_answers

        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=SELF_ANSWER_TOKENS)
    finally:
        model.train(was)
    for p, a in zip(prompts, answers, strict=True):
        if a.strip():
            rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
    if not rows:
        raise DataError(
            "the base answered none of its own prompts",
            hint="pass --keep with data of what the base must keep doing",
        )
    from expertlib.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- after training: does the set do what the data asks? -------------------------------------------


class FitReport(BaseModel):
    """Teacher-forced accuracy of the trained set on training and held-out samples, and a verdict."""

    train_exact: float = Field(description="share of training samples whose every answer token is the argmax")
    eval_exact: float | None = Field(default=None, description="the same on held-out samples")
    train_token_acc: float
    eval_token_acc: float | None = None
    base_eval_exact: float | None = Field(default=None, description="the base's held-out exact match")
    eval_seen: int = Field(
        default=0,
        description="held-out samples left out of the check because their prompt is also a training prompt "
        "(they measure memory, not the skill)",
    )
    answer_tokens: float = Field(description="mean answer tokens per sample")
    dropped: dict[str, float] = Field(
        default_factory=dict, description="layer -> task routing share on experts the keep constraint dropped"
    )
    greedy_exact: float | None = Field(
        default=None, description="share of the decoded sample whose greedy answer is exactly the data's"
    )
    greedy_forced_exact: float | None = Field(
        default=None, description="teacher-forced exact match on the same sample, for comparison"
    )
    greedy_samples: int = Field(default=0, description="prompts decoded greedily")
    greedy_split: Literal["held-out", "training"] | None = Field(
        default=None, description="which split the decoded prompts came from"
    )

    @property
    def judged_on_exact(self) -> bool:
        return self.answer_tokens <= LONG_ANSWER_TOKENS

    @property
    def greedy_short(self) -> bool:
        """Decoded greedily, fewer than SHORT_EXACT of the sampled prompts get exactly the data's answer."""
        return self.greedy_exact is not None and self.greedy_exact < SHORT_EXACT

    @property
    def short(self) -> bool:
        """The set falls short: held-out (else training) exact match below SHORT_EXACT (short answers
        only, teacher-forced), or greedy decoding of the sample below it (any answer length)."""
        if self.greedy_short:
            return True
        if not self.judged_on_exact:
            return False
        return (self.eval_exact if self.eval_exact is not None else self.train_exact) < SHORT_EXACT

    @property
    def cannot_fit(self) -> bool:
        """Short of the training data itself (exact match; token accuracy for long answers)."""
        return (self.train_exact if self.judged_on_exact else self.train_token_acc) < SHORT_EXACT

    def _kept_note(self, keep_hint: str | None, budget_hint: str | None) -> str:
        """For a set that fits its data: what keeping the kept skills left out, and the commands that
        train it (a held-out split of the training data cannot show what those experts would add on
        prompts unlike it: measured, `tail` fit its split and decoded 0.88 of fresh prompts against the
        paper's selection's 0.94)."""
        if not self.dropped:
            return ""
        lost = sum(self.dropped.values()) / len(self.dropped)
        return (
            f". The trade-off: keeping the kept skills left out experts that carry {lost:.2f} of the task's "
            f"routing (layers {', '.join(self.dropped)}); if your own eval finds the set short on prompts unlike "
            "the training data, "
            + (
                f"{budget_hint} trains those within --keep-share of the kept routing and "
                if budget_hint
                else ""
            )
            + (keep_hint or "`--keep none`")
            + " trains them all, at the kept skills' cost"
        )

    def message(self, keep_hint: str | None = None, budget_hint: str | None = None) -> str:
        """The verdict. `keep_hint` is the command that trains what keeping dropped (`--keep none`);
        `budget_hint` the one in between (`--keep-mode budget`), named when the run used contrast."""
        held = (
            f"held-out {self.eval_exact:.2f} (base {self.base_eval_exact:.2f}"
            + (f"; {self.eval_seen} repeating a training prompt left out" if self.eval_seen else "")
            + "), "
            if self.eval_exact is not None and self.base_eval_exact is not None
            else ""
        )
        figures = f"exact answers (teacher-forced): {held}training {self.train_exact:.2f}"
        greedy = (
            f"; decoded greedily: {self.greedy_exact:.2f} of {self.greedy_samples} {self.greedy_split} prompts "
            f"exact (teacher-forced on the same prompts: {self.greedy_forced_exact:.2f})"
            if self.greedy_exact is not None
            else ""
        )
        if not self.judged_on_exact and not self.greedy_short:
            return (
                f"fit: token accuracy training {self.train_token_acc:.2f}"
                + (f", held-out {self.eval_token_acc:.2f}" if self.eval_token_acc is not None else "")
                + greedy
                + f" (answers of {self.answer_tokens:.0f} tokens: judge them with your own eval too)"
            )
        if not self.short:
            return f"fit: the set answers what the data asks; {figures}{greedy}" + self._kept_note(
                keep_hint, budget_hint
            )
        forced_short = self.judged_on_exact and (
            (self.eval_exact if self.eval_exact is not None else self.train_exact) < SHORT_EXACT
        )
        acc = self.eval_token_acc if self.eval_token_acc is not None else self.train_token_acc
        if (
            not forced_short and acc >= SHORT_EXACT
        ):  # only decoding shows it: errors compound along the answer
            return (
                f"the set falls short of what the data asks when it answers on its own: decoded greedily, "
                f"{self.greedy_exact:.2f} of {self.greedy_samples} {self.greedy_split} prompts get exactly the "
                f"data's answer, while teacher-forced (every earlier answer token given) it predicts {acc:.2f} "
                f"of the answer tokens and {self.greedy_forced_exact:.2f} of the same answers whole. Why: one "
                f"wrong token derails the rest of an answer of {self.answer_tokens:.0f} tokens, and a "
                "teacher-forced score never sees it. Train more steps or on more data, and judge the set by its "
                "decoded answers (`expertlib eval BASE --data DATA -e SET`); if it still falls short, the skill "
                "needs what ESFT freezes (attention): use full fine-tuning or LoRA."
            )
        lost = sum(self.dropped.values())
        if self.cannot_fit and lost > 0:
            why = (
                f"the experts selected cannot fit even the training data, and keeping general ability dropped "
                f"experts that carry {lost / max(1, len(self.dropped)):.2f} of the task's routing (layers "
                f"{', '.join(self.dropped)}). The trade-off: "
                + (
                    f"{budget_hint} trains those that carry at most --keep-share of the kept routing per layer, "
                    if budget_hint
                    else ""
                )
                + (keep_hint or "`--keep none`")
                + " trains them all; each learns more of the task at the cost of the kept skills (check both "
                "with --eval-data). "
                "If that does not fit the training data either, the skill needs what ESFT freezes (attention, "
                "which moves information between positions): use full fine-tuning or LoRA"
            )
        elif self.cannot_fit:
            why = (
                "the trained experts cannot fit even the training data: the skill needs what ESFT freezes "
                "(attention, which moves information between positions, e.g. reordering or copying; or "
                "experts the task does not route to). ESFT is the wrong tool for it: try "
                "--train-non-expert-modules, full fine-tuning or LoRA"
            )
        else:
            why = (
                "the set fits the training data but not the held-out data: it memorised; give more data, "
                "train fewer steps, or hold data out with --early-stop"
            )
        return f"the set falls short of what the data asks: {figures}{greedy}. Why: {why}."


@torch.no_grad()
def _forced(
    model: nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 32
) -> tuple[float, float]:
    """(exact match, token accuracy) under teacher forcing: answer tokens predicted by argmax."""
    from expertlib.devices import input_device

    device = input_device(model)
    exact = tokens = right = 0
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i : i + batch_size], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (B, S, V)
        pred = logits[:, :-1].argmax(-1).cpu()
        target = batch["labels"][:, 1:]
        counted = target != IGNORE_INDEX
        ok = (pred == target) & counted
        exact += int((ok | ~counted).all(dim=1).sum())
        right += int(ok.sum())
        tokens += int(counted.sum())
    return exact / max(1, len(samples)), right / max(1, tokens)


def _prompt(s: Sample) -> tuple[int, ...]:
    """The tokens before a sample's first answer token."""
    start = next((i for i, t in enumerate(s.labels) if t != IGNORE_INDEX), len(s.labels))
    return tuple(s.input_ids[:start])


@torch.no_grad()
def _greedy(model: nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 32) -> float:
    """Share of `samples` whose greedy answer is exactly theirs: each decoded from its prompt (the
    tokens before its first answer token) for as many tokens as that answer (at most
    GREEDY_MAX_TOKENS; EOS included), prompts of one length batched together (no padding)."""
    from expertlib.devices import input_device

    device = input_device(model)
    by_len: dict[int, list[tuple[list[int], list[int]]]] = {}
    for s in samples:
        start = next(i for i, t in enumerate(s.labels) if t != IGNORE_INDEX)
        end = next((i for i in range(start, len(s.labels)) if s.labels[i] == IGNORE_INDEX), len(s.labels))
        by_len.setdefault(start, []).append(
            (list(s.input_ids[:start]), list(s.input_ids[start:end][:GREEDY_MAX_TOKENS]))
        )
    right = 0
    for pairs in by_len.values():
        for i in range(0, len(pairs), batch_size):
            part = pairs[i : i + batch_size]
            ids = torch.tensor([p for p, _ in part], device=device)  # (B, prompt)
            longest = max(len(a) for _, a in part)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=longest,
                min_new_tokens=0,
                do_sample=False,
                pad_token_id=pad_id,
            )[:, ids.shape[1] :].tolist()  # (B, <= longest)
            right += sum(o[: len(a)] == a for o, (_, a) in zip(out, part, strict=True))
    return right / max(1, len(samples))


def fit_check(
    model: nn.Module,
    expert_set,
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample] = (),
    *,
    pad_id: int,
    n: int = 128,
    greedy: int = GREEDY_SAMPLES,
    dropped: dict[str, float] | None = None,
) -> FitReport:
    """`FitReport` of `expert_set` applied to `model` (reverted after) on up to `n` samples of each
    split, and greedy decoding of up to `greedy` of them (held-out ones when there are any). A
    held-out sample whose prompt is also a training prompt is left out (`FitReport.eval_seen`): a
    split of data with repeated prompts would otherwise score memory as skill."""
    from expertlib.apply import apply_expert_set

    seen = {_prompt(s) for s in train_samples}
    unseen = [s for s in eval_samples if _prompt(s) not in seen]
    train_s, eval_s = list(train_samples[:n]), unseen[:n]
    split = "held-out" if eval_s else "training"
    decoded = [s for s in (eval_s or train_s) if any(t != IGNORE_INDEX for t in s.labels)][:greedy]
    was = model.training
    model.eval()
    try:
        base_eval = _forced(model, eval_s, pad_id)[0] if eval_s else None
        with apply_expert_set(model, expert_set, check_base=False, verify=False):  # the model it trained on
            tr = _forced(model, train_s, pad_id)
            ev = _forced(model, eval_s, pad_id) if eval_s else None
            g = _greedy(model, decoded, pad_id) if decoded else None
            g_forced = _forced(model, decoded, pad_id)[0] if decoded else None
    finally:
        model.train(was)
    answer = sum(s.num_answer_tokens for s in train_s) / max(1, len(train_s))
    return FitReport(
        train_exact=round(tr[0], 4),
        train_token_acc=round(tr[1], 4),
        eval_exact=None if ev is None else round(ev[0], 4),
        eval_token_acc=None if ev is None else round(ev[1], 4),
        base_eval_exact=None if base_eval is None else round(base_eval, 4),
        answer_tokens=round(answer, 2),
        dropped=dropped or {},
        greedy_exact=None if g is None else round(g, 4),
        greedy_forced_exact=None if g_forced is None else round(g_forced, 4),
        greedy_samples=len(decoded),
        eval_seen=len(eval_samples) - len(unseen),
        greedy_split=split if decoded else None,
    )
