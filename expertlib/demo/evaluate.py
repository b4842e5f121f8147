"""Exact-match evaluation of a base model and of expert sets on the toy tasks.

Greedy generation with transformers (`generate`, prompts batched with left padding). Each
expert set is applied in place (`expertlib.apply.apply_expert_set`), evaluated, and reverted
bit-exactly, so one loaded base serves every set in turn.

    result = evaluate("~/.cache/expertlib/demo/base-...", expert_sets=["caesar.safetensors"])
    result.table()          # rows: task; columns: base, each set
    result.to_dict()        # JSON form
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertlib.demo.tasks import Example, collate, encode, get_task, resolve_tasks
from expertlib.evaluation import generate_answers
from expertlib.patch import ExpertSet


@torch.no_grad()
def eval_examples(task: str, n_eval: int = 100, seed: int = 0, limit: int | None = None) -> list[Example]:
    ev = get_task(task).split(n_train=0, n_eval=n_eval, seed=seed).eval
    return ev[:limit] if limit else ev


def answer_budget(examples: Sequence[Example]) -> int:
    return max(len(ex.answer) for ex in examples) + 2


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str] | None = None,
    *,
    n_eval: int = 100,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    desc: str = "evaluating",
    details: dict[str, list[dict]] | None = None,
) -> dict[str, float]:
    """Exact-match accuracy of `model` as it is now on each task's eval split."""
    from tqdm.auto import tqdm

    names = resolve_tasks(tasks)
    sets = {t: eval_examples(t, n_eval, seed, limit) for t in names}
    acc: dict[str, float] = {}
    with tqdm(total=sum(len(v) for v in sets.values()), desc=desc, disable=not progress, unit="q") as bar:
        for t, exs in sets.items():
            preds = generate_answers(
                model, tokenizer, [ex.prompt for ex in exs], max_new_tokens=answer_budget(exs), bar=bar
            )
            task = get_task(t)
            scores = [task.score(p, ex.answer) for p, ex in zip(preds, exs, strict=True)]
            acc[t] = round(sum(scores) / len(scores), 4)
            if details is not None:
                details[t] = [
                    {"prompt": ex.prompt, "answer": ex.answer, "prediction": p, "correct": bool(s)}
                    for ex, p, s in zip(exs, preds, scores, strict=True)
                ]
    return acc


@dataclass
class EvalResult:
    """Accuracy per task (rows) for the base and each expert set (columns)."""

    base: str
    tasks: list[str]
    columns: list[str]
    accuracy: dict[str, dict[str, float]]  # column -> task -> accuracy
    n_eval: dict[str, int] = field(default_factory=dict)
    samples: dict[str, dict[str, list[dict]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from expertlib.demo.tasks import TASKS

        return {
            "base": self.base,
            "tasks": {t: {"kind": TASKS[t].kind, "n_eval": self.n_eval.get(t)} for t in self.tasks},
            "accuracy": self.accuracy,
            "mean": {c: self.mean(c) for c in self.columns},
        }

    def mean(self, column: str) -> dict[str, float]:
        from expertlib.demo.tasks import TASKS

        out = {}
        for k in ("general", "domain", "specialised"):
            vals = [self.accuracy[column][t] for t in self.tasks if TASKS[t].kind == k]
            if vals:
                out[k] = round(sum(vals) / len(vals), 4)
        return out

    def rows(self) -> list[list[Any]]:
        from expertlib.demo.tasks import TASKS

        rows = [[t, TASKS[t].kind, *(f"{self.accuracy[c][t]:.2f}" for c in self.columns)] for t in self.tasks]
        for k in ("specialised", "general", "domain"):
            if any(TASKS[t].kind == k for t in self.tasks):
                rows.append([f"mean {k}", "", *(f"{self.mean(c).get(k, 0):.2f}" for c in self.columns)])
        return rows


def evaluate(
    base: str | Path,
    expert_sets: Sequence[str | Path] = (),
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    n_eval: int = 100,
    seed: int = 0,
    open_named: Callable[[str], ExpertSet] | None = None,
    progress: bool = True,
    keep_samples: bool = False,
    device: str = "auto",
) -> EvalResult:
    """Accuracy of BASE and of each expert set (applied in place, then reverted) on each task.

    `expert_sets` are patch paths, or names that `open_named` opens (`expertlib eval` passes its
    registry's `open`).

    The model runs on `device` (auto: CUDA when present, `expertlib.devices`)."""
    from transformers import AutoTokenizer

    from expertlib.apply import apply_expert_set
    from expertlib.devices import resolve_device
    from expertlib.loading import open_expert_set
    from expertlib.moe import load_model

    model = load_model(base, dtype=torch.float32).to(resolve_device(device))
    tok = AutoTokenizer.from_pretrained(str(base))
    names = resolve_tasks(tasks)
    loaded = [(str(ref), open_expert_set(ref, open_named=open_named).expert_set) for ref in expert_sets]
    columns = ["base"] + [label for label, _ in loaded]
    accuracy: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[dict]]] = {}
    det: dict[str, list[dict]] = {}
    accuracy["base"] = evaluate_model(
        model, tok, names, n_eval=n_eval, seed=seed, limit=limit, progress=progress, desc="base", details=det
    )
    samples["base"] = det
    for label, es in loaded:
        det = {}
        with apply_expert_set(model, es):
            accuracy[label] = evaluate_model(
                model,
                tok,
                names,
                n_eval=n_eval,
                seed=seed,
                limit=limit,
                progress=progress,
                desc=label,
                details=det,
            )
        samples[label] = det
    n = {t: len(eval_examples(t, n_eval, seed, limit)) for t in names}
    return EvalResult(str(base), names, columns, accuracy, n, samples if keep_samples else {})


def task_routing(model, tokenizer, tasks: Sequence[str], *, n: int = 100, seed: int = 1) -> dict[str, dict]:
    """ESFT-Token routing shares of each task's eval prompts (with answers) on `model`, per layer.

    Counted: the positions that produce the answers (`expertlib.esft.scoring.trained_positions`),
    where the tasks differ; the chat template every task shares is left out.
    """
    import tempfile

    from expertlib.demo.tasks import write_jsonl
    from expertlib.esft.data import load_samples, pad_token_id
    from expertlib.esft.diagnostics import routing_shares

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for t in resolve_tasks(tasks):
            path = write_jsonl(eval_examples(t, n, seed), Path(d) / f"{t}.jsonl")
            samples = load_samples(path, tokenizer)
            out[t] = routing_shares(
                model, samples, pad_id=pad_token_id(tokenizer), token_budget=None, count_prompt_tokens=False
            )
    return out


def task_specialisation(base: str | Path, tasks: Sequence[str] | None = None, *, n: int = 100):
    """`expertlib.esft.diagnostics.Specialisation` of the demo tasks on BASE (top-k = the routing width)."""
    from transformers import AutoTokenizer

    from expertlib.esft.diagnostics import specialisation
    from expertlib.moe import load_model

    model = load_model(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base))
    return specialisation(task_routing(model, tok, tasks or [], n=n), k=model.config.num_experts_per_tok)


@torch.no_grad()
def forced_accuracy(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 128) -> float:
    """Exact match under teacher forcing: every answer token (and EOS) is the argmax given the gold
    prefix. Greedy decoding gives exactly the answer then EOS iff this holds, so it equals the
    generated exact match except where greedy output is right but ends otherwise (a newline):
    a lower bound, one forward pass per batch instead of one per token (for learning curves)."""
    was = model.training
    model.eval()
    enc = encode(tokenizer, list(examples))
    correct = 0
    try:
        for i in range(0, len(enc), batch_size):
            part = enc[i : i + batch_size]
            batch = collate(part, tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            pred = logits[:, :-1].argmax(-1)
            target = batch["labels"][:, 1:]
            ok = ((pred == target) | (target == -100)).all(dim=1)
            correct += int(ok.sum())
    finally:
        model.train(was)
    return correct / max(1, len(enc))
