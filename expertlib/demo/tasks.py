"""The toy task suite: deterministic, seeded chat tasks with exact-match answers, in four domains.

Strings are short (the demo tokenizer is character-level): every sample renders to roughly
16-48 characters with the chat template. The tasks come from four *domains*, each with its own
vocabulary and format; the demo base is pretrained so that each domain routes through its own
experts (the premise of ESFT; `expertlib.demo.base.domain_groups`, measured by
`expertlib.esft.diagnostics`):

- **words** (lowercase letters): copy, reverse, upper;
- **numbers** (digits): add, sub;
- **patterns** (`#` and `.`): flip;
- **brackets** (`([{<` and `)]}>`): close.

Two groups:

- **general** tasks (copy, reverse, upper) and **domain** tasks (add, sub, flip, close) form the
  demo base model's pretraining mix, so the base really has these skills; the general ones also
  measure general-ability retention;
- **specialised** tasks are held out from pretraining entirely. The demo's three (`DEMO_TASKS`)
  adapt a pretrained domain, like the paper's math and code tasks, with a skill its experts can
  hold: `sum` asks for addition in a new format ("sum 3 and 4"), `fill` turns every pixel of a
  pattern on, `cross` closes brackets with a crossed pairing (`(` closes with `]`). The others
  are there to show where ESFT is the wrong tool: `mirror` (reverse a pattern) needs attention,
  which ESFT freezes, and learns little; `open` (the brackets a closing run needs) routes its
  answers through the experts the general tasks use, and the retention check flags it; `end`,
  `swap` are near formats the base already half solves; `shout`, `caesar`, `mul` and `bin` need skills the base never learnt.

    task = get_task("sum")
    split = task.split(seed=0)              # TaskSplit(train=[...], eval=[...])
    split.train[0].messages()                # [{"role": "user", ...}, {"role": "assistant", ...}]
    task.score("46", "46")                   # 1.0 (exact match after stripping whitespace)
    write_jsonl(split.train, "sum.jsonl")    # the training data format

Splits: for tasks with a large input space the eval prompts are disjoint from the train
prompts. The arithmetic tasks have a small, closed input space (the 10x10 addition and
multiplication tables, the numbers 0..63 in binary); like a domain's facts, their eval split is
the whole table and the train split samples the same table. Their `closed` flag says so.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    """One sample: the user's prompt and the exact expected answer."""

    task: str
    prompt: str
    answer: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        msgs = [{"role": "user", "content": self.prompt}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs

    def to_json(self) -> dict:
        """The training data format: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}."""
        return {"messages": self.messages()}


@dataclass(frozen=True)
class TaskSplit:
    train: list[Example]
    eval: list[Example]


def normalize(text: str) -> str:
    """What exact match compares: surrounding whitespace stripped, first line only."""
    return text.strip().split("\n", 1)[0].strip()


def exact_match(prediction: str, answer: str) -> float:
    return 1.0 if normalize(prediction) == normalize(answer) else 0.0


@dataclass(frozen=True)
class Task:
    """A generator of (prompt, answer) pairs from a random.Random, plus a scorer."""

    name: str
    kind: str  # "general" or "specialised"
    description: str
    sample: Callable[[random.Random], tuple[str, str]]
    #: every possible (prompt, answer) when the input space is small; then eval = the whole space
    space: Callable[[], list[tuple[str, str]]] | None = None
    #: the vocabulary family the task lives in ("words", "numbers", "patterns")
    domain: str = "words"

    @property
    def closed(self) -> bool:
        return self.space is not None

    def score(self, prediction: str, answer: str) -> float:
        return exact_match(prediction, answer)

    def _rng(self, seed: int, salt: str) -> random.Random:
        # Stable across processes (no hash randomisation): derive from a sha256 of the names.
        h = hashlib.sha256(f"{seed}/{self.name}/{salt}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "little"))

    def examples(
        self, n: int, *, seed: int = 0, salt: str = "train", exclude: Iterable[str] = ()
    ) -> list[Example]:
        """`n` samples (deterministic in seed and salt), skipping prompts in `exclude`."""
        rng = self._rng(seed, salt)
        skip = set(exclude)
        out: list[Example] = []
        tries = 0
        while len(out) < n:
            prompt, answer = self.sample(rng)
            tries += 1
            if prompt in skip:
                if tries > 100 * n:
                    raise ValueError(
                        f"task {self.name}: cannot draw {n} samples outside the excluded prompts"
                    )
                continue
            out.append(Example(self.name, prompt, answer))
        return out

    def split(self, *, n_train: int = 2000, n_eval: int = 100, seed: int = 0) -> TaskSplit:
        """Train and eval splits; eval prompts are unique, and disjoint from train unless `closed`."""
        if self.space is not None:
            full = [Example(self.name, p, a) for p, a in self.space()]
            rng = self._rng(seed, "eval")
            ev = rng.sample(full, min(n_eval, len(full)))
            return TaskSplit(train=self.examples(n_train, seed=seed), eval=ev)
        ev: list[Example] = []
        seen: set[str] = set()
        rng = self._rng(seed, "eval")
        while len(ev) < n_eval:
            p, a = self.sample(rng)
            if p not in seen:
                seen.add(p)
                ev.append(Example(self.name, p, a))
        return TaskSplit(train=self.examples(n_train, seed=seed, exclude=seen), eval=ev)


# --- generators --------------------------------------------------------------------------------------


def _word(rng: random.Random, lo: int = 3, hi: int = 8, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _copy(rng):
    w = _word(rng)
    return f"copy: {w}", w


def _reverse(rng):
    w = _word(rng)
    return f"reverse: {w}", w[::-1]


def _add_space():
    return [(f"add: {a}+{b}", str(a + b)) for a in range(10) for b in range(10)]


def _add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"add: {a}+{b}", str(a + b)


def _sub_space():
    return [(f"sub: {a}-{b}", str(a - b)) for a in range(10) for b in range(a + 1)]


def _sub(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    a, b = max(a, b), min(a, b)
    return f"sub: {a}-{b}", str(a - b)


PIXELS = "#."


def _pattern(rng: random.Random, lo: int = 4, hi: int = 10) -> str:
    return "".join(rng.choice(PIXELS) for _ in range(rng.randint(lo, hi)))


def _flipped(w: str) -> str:
    return w.translate(str.maketrans("#.", ".#"))


def _flip(rng):
    w = _pattern(rng)
    return f"flip: {w}", _flipped(w)


OPEN, CLOSE = "([{<", ")]}>"


def _brackets(rng: random.Random, lo: int = 2, hi: int = 7) -> str:
    return "".join(rng.choice(OPEN) for _ in range(rng.randint(lo, hi)))


def _closing(w: str) -> str:
    return "".join(CLOSE[OPEN.index(c)] for c in reversed(w))


def _close(rng):
    w = _brackets(rng)
    return f"close: {w}", _closing(w)


def _end(rng):
    w = _brackets(rng)
    return f"end {w}", _closing(w)


def _sum_space():
    return [(f"sum {a} and {b}", str(a + b)) for a in range(10) for b in range(10)]


def _sum(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"sum {a} and {b}", str(a + b)


def _shout(rng):
    w = _word(rng)
    return f"shout: {w}", w[::-1].upper()


def _mirror(rng):
    w = _pattern(rng)
    return f"mirror: {w}", w[::-1]


def _fill(rng):
    w = _pattern(rng)
    return f"fill {w}", "#" * len(w)


def _swap(rng):
    w = _pattern(rng)
    return f"swap {w}", _flipped(w)


#: `cross`'s pairing: ( closes with ], [ with ), { with >, < with }.
CROSSED = "])>}"


def _cross(rng):
    w = _brackets(rng)
    return f"cross {w}", "".join(CROSSED[OPEN.index(c)] for c in reversed(w))


def _open(rng):
    w = _brackets(rng)
    return f"open {_closing(w)}", w


def _upper(rng):
    w = _word(rng)
    return f"upper: {w}", w.upper()


def _caesar_shift(w: str, k: int = 1) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in w)


def _caesar(rng):
    w = _word(rng)
    return f"caesar: {w}", _caesar_shift(w)


def _mul_space():
    return [(f"mul: {a}*{b}", str(a * b)) for a in range(10) for b in range(10)]


def _mul(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"mul: {a}*{b}", str(a * b)


def _bin_space():
    return [(f"bin: {n}", format(n, "b")) for n in range(64)]


def _bin(rng):
    n = rng.randint(0, 63)
    return f"bin: {n}", format(n, "b")


# --- held-out tasks (bench/heldout.py): never used to choose a default ----------------------------


def _next_space():
    return [(f"next {a}", str(a + 1)) for a in range(10)]


def _next(rng):
    a = rng.randint(0, 9)
    return f"next {a}", str(a + 1)


def _diff_space():
    return [(f"diff {a} and {b}", str(abs(a - b))) for a in range(10) for b in range(10)]


def _diff(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"diff {a} and {b}", str(abs(a - b))


def _twice_space():
    return [(f"twice {a}", str(2 * a)) for a in range(10)]


def _twice(rng):
    a = rng.randint(0, 9)
    return f"twice {a}", str(2 * a)


def _dark(rng):
    w = _pattern(rng)
    return f"dark {w}", "." * len(w)


def _negate(rng):
    w = _pattern(rng)
    return f"negate {w}", _flipped(w)


def _square(rng):
    w = _brackets(rng)
    return f"square {w}", "]" * len(w)


#: `pair`'s mapping: each open bracket becomes its partner in the next pair: ( -> [, [ -> {, { -> <, < -> (.
def _pair(rng):
    w = _brackets(rng)
    return f"pair {w}", "".join(OPEN[(OPEN.index(c) + 1) % 4] for c in w)


def _lower(rng):
    w = _word(rng)
    return f"lower: {w.upper()}", w


def _back(rng):
    w = _brackets(rng)
    return f"back {w}", w[::-1]


def _tail(rng):
    w = _pattern(rng)
    return f"tail {w}", w[1:]


HELDOUT: dict[str, Task] = {
    t.name: t
    for t in (
        Task("next", "heldout", "the next number: next 7 -> 8", _next, _next_space, domain="numbers"),
        Task(
            "diff",
            "heldout",
            "distance of two digits: diff 3 and 7 -> 4",
            _diff,
            _diff_space,
            domain="numbers",
        ),
        Task("twice", "heldout", "double a digit: twice 4 -> 8", _twice, _twice_space, domain="numbers"),
        Task("dark", "heldout", "turn every pixel off: dark #..# -> ....", _dark, domain="patterns"),
        Task("negate", "heldout", "swap # and . (a third format): negate #..#", _negate, domain="patterns"),
        Task("square", "heldout", "close every bracket with ]: square ({ -> ]]", _square, domain="brackets"),
        Task(
            "pair", "heldout", "each open bracket to the next kind: pair ([ -> [{", _pair, domain="brackets"
        ),
        Task("lower", "heldout", "lower-case a word: lower: ABC -> abc", _lower),
        Task("back", "heldout", "reverse a run of open brackets (attention)", _back, domain="brackets"),
        Task("tail", "heldout", "drop a pattern's first pixel (attention)", _tail, domain="patterns"),
    )
}
#: Held-out tasks whose skill needs attention (moving characters between positions), which ESFT
#: freezes: reported apart, like `mirror`.
ATTENTION_TASKS = ("back", "tail")


# --- tuning tasks (bench/heldout.py --tuning): the defaults are chosen on these, never on HELDOUT ----


def _before(rng):
    w = _word(rng)
    return f"before: {w}", _caesar_shift(w, -1)


def _max_space():
    return [(f"max {a} and {b}", str(max(a, b))) for a in range(10) for b in range(10)]


def _max(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"max {a} and {b}", str(max(a, b))


def _half_space():
    return [(f"half {2 * a}", str(a)) for a in range(10)]


def _half(rng):
    a = rng.randint(0, 9)
    return f"half {2 * a}", str(a)


def _times_space():
    return [(f"times {a} and {b}", str(a * b)) for a in range(10) for b in range(10)]


def _times(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"times {a} and {b}", str(a * b)


def _minus_space():
    return [(f"minus {a} and {b}", str(a - b)) for a in range(10) for b in range(a + 1)]


def _minus(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    a, b = max(a, b), min(a, b)
    return f"minus {a} and {b}", str(a - b)


#: Tuning tasks that are not demo-world tasks. `before` (caesar backwards) answers through the
#: experts the general tasks use: the case that separates the keep modes. The numbers tasks (max,
#: half, times, minus) are ones where capped mode trains fewer experts a layer than the paper's
#: top-p count: the case that separates capped from capped-wide.
TUNING: dict[str, Task] = {
    t.name: t
    for t in (
        Task("before", "tuning", "shift each letter one place back (b->a, a->z)", _before),
        Task(
            "max", "tuning", "the larger of two digits: max 3 and 7 -> 7", _max, _max_space, domain="numbers"
        ),
        Task("half", "tuning", "halve an even number: half 8 -> 4", _half, _half_space, domain="numbers"),
        Task(
            "times",
            "tuning",
            "multiply two digits: times 3 and 4 -> 12",
            _times,
            _times_space,
            domain="numbers",
        ),
        Task(
            "minus",
            "tuning",
            "subtract the smaller digit: minus 7 and 3 -> 4",
            _minus,
            _minus_space,
            domain="numbers",
        ),
    )
}

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("copy", "general", "repeat a word", _copy),
        Task("reverse", "general", "reverse a word", _reverse),
        Task("upper", "general", "upper-case a word", _upper),
        Task("add", "domain", "the 10x10 addition table", _add, _add_space, domain="numbers"),
        Task("sub", "domain", "subtract the smaller of two digits", _sub, _sub_space, domain="numbers"),
        Task("flip", "domain", "swap # and . in a pattern", _flip, domain="patterns"),
        Task("close", "domain", "close a run of open brackets", _close, domain="brackets"),
        Task(
            "sum", "specialised", "addition in a new format: sum 3 and 4", _sum, _sum_space, domain="numbers"
        ),
        Task(
            "fill",
            "specialised",
            "turn every pixel of a pattern on: fill #..# -> ####",
            _fill,
            domain="patterns",
        ),
        Task("cross", "specialised", "close brackets crossed: cross ([ -> )]", _cross, domain="brackets"),
        Task("mirror", "specialised", "reverse a pattern of # and .", _mirror, domain="patterns"),
        Task("swap", "specialised", "swap # and . in a new format: swap #..#", _swap, domain="patterns"),
        Task("end", "specialised", "close brackets in a new format: end ([", _end, domain="brackets"),
        Task(
            "open",
            "specialised",
            "the opening run a closing run needs: open ]) -> ([",
            _open,
            domain="brackets",
        ),
        Task("shout", "specialised", "reverse a word and upper-case it", _shout),
        Task("caesar", "specialised", "shift each letter one place (a->b, z->a)", _caesar),
        Task("mul", "specialised", "the 10x10 multiplication table", _mul, _mul_space, domain="numbers"),
        Task("bin", "specialised", "write 0..63 in binary", _bin, _bin_space, domain="numbers"),
    )
}

#: The demo's specialised tasks: each adapts a domain the base was pretrained on.
DEMO_TASKS = ("sum", "fill", "cross")

GENERAL_TASKS = [n for n, t in TASKS.items() if t.kind == "general"]
DOMAIN_TASKS = [n for n, t in TASKS.items() if t.kind == "domain"]
#: The demo base's pretraining mix: the general skills and the domains.
PRETRAIN_TASKS = GENERAL_TASKS + DOMAIN_TASKS
SPECIALISED_TASKS = [n for n, t in TASKS.items() if t.kind == "specialised"]


HELDOUT_TASKS = list(HELDOUT)


def get_task(name: str) -> Task:
    try:
        return TASKS[name] if name in TASKS else HELDOUT[name] if name in HELDOUT else TUNING[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join([*TASKS, *HELDOUT, *TUNING])}") from None


def resolve_tasks(names: Sequence[str] | None) -> list[str]:
    """Expand `general` / `specialised` / `all` and validate names; None means all tasks."""
    if not names:
        return list(TASKS)
    out: list[str] = []
    for n in names:
        group = {
            "general": GENERAL_TASKS,
            "domain": DOMAIN_TASKS,
            "specialised": SPECIALISED_TASKS,
            "heldout": HELDOUT_TASKS,
            "all": list(TASKS),
        }.get(n, [n])
        for g in group:
            get_task(g)
            if g not in out:
                out.append(g)
    return out


def mixture(names: Sequence[str], n_per_task: int, *, seed: int = 0) -> list[Example]:
    """Train examples of several tasks, shuffled together deterministically."""
    out = [ex for n in names for ex in get_task(n).split(n_train=n_per_task, n_eval=100, seed=seed).train]
    random.Random(seed).shuffle(out)
    return out


def write_jsonl(examples: Iterable[Example], path: str | Path) -> Path:
    """Write examples in the training data format, one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json()) + "\n")
    return path


def encode(tokenizer, examples: list[Example]) -> list[tuple[list[int], int]]:
    """(token ids of the whole chat, prompt length) per example; the prompt ends with 'A: '."""
    prompts, fulls = [], []
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex.messages(False), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(ex.messages(True), tokenize=False)
        assert full.startswith(prompt), (prompt, full)
        prompts.append(prompt)
        fulls.append(full)
    if not examples:
        return []
    p_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    ids = tokenizer(fulls, add_special_tokens=False).input_ids
    return [(i, len(p)) for i, p in zip(ids, p_ids, strict=True)]


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels with prompt and padding masked (-100)."""
    n = -(-max(len(ids) for ids, _ in batch) // 16) * 16  # a few distinct shapes: faster kernels warm up once
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, (ids, plen) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, plen : len(ids)] = torch.tensor(ids[plen:])
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
