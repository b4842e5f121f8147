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
samples the set answers exactly (teacher-forced), and says when the set falls short of what
the data asks and why (`FitReport.message`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    answer_tokens: float = Field(description="mean answer tokens per sample")
    dropped: dict[str, float] = Field(
        default_factory=dict, description="layer -> task routing share on experts the keep constraint dropped"
    )

    @property
    def judged_on_exact(self) -> bool:
        return self.answer_tokens <= LONG_ANSWER_TOKENS

    @property
    def short(self) -> bool:
        """The set falls short: held-out (else training) exact match below SHORT_EXACT (short answers only)."""
        if not self.judged_on_exact:
            return False
        return (self.eval_exact if self.eval_exact is not None else self.train_exact) < SHORT_EXACT

    @property
    def cannot_fit(self) -> bool:
        return self.train_exact < SHORT_EXACT

    def message(self, keep_hint: str | None = None, budget_hint: str | None = None) -> str:
        """The verdict. `keep_hint` is the command that trains what keeping dropped (`--keep none`);
        `budget_hint` the one in between (`--keep-mode budget`), named when the run used contrast."""
        held = (
            f"held-out {self.eval_exact:.2f} (base {self.base_eval_exact:.2f}), "
            if self.eval_exact is not None and self.base_eval_exact is not None
            else ""
        )
        figures = f"exact answers (teacher-forced): {held}training {self.train_exact:.2f}"
        if not self.judged_on_exact:
            return (
                f"fit: token accuracy training {self.train_token_acc:.2f}"
                + (f", held-out {self.eval_token_acc:.2f}" if self.eval_token_acc is not None else "")
                + f" (answers of {self.answer_tokens:.0f} tokens: judge them with your own eval)"
            )
        if not self.short:
            return f"fit: the set answers what the data asks; {figures}"
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
        return f"the set falls short of what the data asks: {figures}. Why: {why}."


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


def fit_check(
    model: nn.Module,
    expert_set,
    train_samples: Sequence[Sample],
    eval_samples: Sequence[Sample] = (),
    *,
    pad_id: int,
    n: int = 128,
    dropped: dict[str, float] | None = None,
) -> FitReport:
    """`FitReport` of `expert_set` applied to `model` (reverted after) on up to `n` samples of each split."""
    from expertlib.apply import apply_expert_set

    train_s, eval_s = list(train_samples[:n]), list(eval_samples[:n])
    was = model.training
    model.eval()
    try:
        base_eval = _forced(model, eval_s, pad_id)[0] if eval_s else None
        with apply_expert_set(model, expert_set, check_base=False, verify=False):  # the model it trained on
            tr = _forced(model, train_s, pad_id)
            ev = _forced(model, eval_s, pad_id) if eval_s else None
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
    )
