"""ESFT relevance scores: how much a task uses each routed expert (ESFT.md, "Relevance scores").

For MoE layer l and routed expert i, over N_s sequences j of L_j counted tokens k:

    ESFT-Gate   G_i = 1/N_s * sum_j 1/L_j * sum_k g_{i,k}
    ESFT-Token  R_i = 1/N_s * sum_j 1/L_j * sum_k 1[i in topK(k)] / K

g_{i,k} is the weight the architecture multiplies into expert i's output for token k (the
router affinity, after whatever top-k renormalisation or scaling the architecture applies;
0 outside the token's top-K). Routing is recorded with a forward pre-hook on each layer's
experts module, which every supported architecture calls as
`experts(hidden (T, H), top_k_index (T, K), top_k_weights (T, K))`.

Normalisation is **per layer**: the averages above are taken inside each layer, so the token
scores of every layer sum to exactly 1 and the gate scores of a layer sum to the mean top-K gate
mass. The reference code's `generate_expert_config.py` instead divides by the sum over layers
(numpy axis 0) — a known bug (deepseek-ai/ESFT issues #8 and #17) that makes the top-p rule
select a different number of experts per layer; we follow the paper.

Padding never counts. With `count_prompt_tokens=False` only the positions the loss trains count:
those whose next token is an answer token (`trained_positions`: the last prompt token, which
produces the first answer token, through the answer's second-to-last token), and L_j is their
number in sequence j.

Weighting (`weighting=`): "paper" (default) is the formulas above, every sequence weighing the
same whatever its length. "reference" reproduces the reference code (deepseek-ai/ESFT
`generate_expert_config.py` and its committed `summary.json`): all counted tokens pooled, sums
divided per layer by the number of counted tokens, scores rounded to 4 decimals. The two agree
when all sequences have the same length; with mixed lengths the reference lets long sequences
dominate, and the top-p rule then picks different experts in a few layers.

What `p` means for ESFT-Gate depends on the architecture: a layer's gate scores sum to the mean
per-token top-K weight mass. DeepSeek-V2 (the paper's model) does not renormalise its top-6
weights (mass 0.26-0.53), so p = 0.1 keeps experts up to roughly 20-40% of the mass. Mixtral,
and Qwen-MoE / OLMoE configs with `norm_topk_prob` set (Qwen3-30B-A3B), renormalise the top-K
weights to sum to 1: there p = 0.1 keeps only 10% of the mass, i.e. fewer experts. DeepSeek-V3
renormalises and multiplies by `routed_scaling_factor` (2.5): p = 0.1 is 4% of the mass. Scale p
to the architecture, or use ESFT-Token, whose scores sum to 1 in every layer everywhere.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from expertlib.errors import SelectionError
from expertlib.esft.data import IGNORE_INDEX, Sample, collate
from expertlib.fsutil import atomic_write_text
from expertlib.identity import BaseIdentity, base_identity
from expertlib.moe import experts_module, moe_layer_indices

ScoreFunction = Literal["token", "gate"]
#: How sequences are weighed: the paper's 1/L_j per sequence, or the reference code's pooled tokens.
Weighting = Literal["paper", "reference"]
WEIGHTINGS = ("paper", "reference")
SCORES_FORMAT = "expertlib.scores/1"
#: The paper's scoring sample: 32 sequences x 4096 tokens.
PAPER_TOKEN_BUDGET = 131_072


class ExpertScores(BaseModel):
    """Per-layer ESFT scores of one task on one base, with how they were computed."""

    format: str = SCORES_FORMAT
    base: BaseIdentity
    num_experts: int
    top_k: int
    token: dict[int, list[float]] = Field(description="MoE layer -> ESFT-Token score per routed expert")
    gate: dict[int, list[float]] = Field(description="MoE layer -> ESFT-Gate score per routed expert")
    tokens_scored: int = Field(description="counted tokens (padding never counts)")
    sequences: int = Field(description="N_s: sequences with at least one counted token")
    token_budget: int | None = None
    count_prompt_tokens: bool = True
    data_digest: str | None = None
    data_path: str | None = None
    seed: int = 0
    weighting: Weighting = Field(default="paper", description="paper: 1/L_j per sequence; reference: pooled")
    token_every: dict[int, list[float]] | None = Field(
        default=None,
        description="answer-only scores: the ESFT-Token scores of the same sample with every position "
        "counted, as the paper scores (the per-layer count capped-wide fills to); None: not recorded",
    )
    gate_every: dict[int, list[float]] | None = Field(default=None, description="the same for ESFT-Gate")

    def of(self, score: ScoreFunction) -> dict[int, list[float]]:
        if score not in ("token", "gate"):
            raise SelectionError(f"unknown score function {score!r}", hint="use 'token' or 'gate'")
        return self.token if score == "token" else self.gate

    def every(self, score: ScoreFunction) -> dict[int, list[float]]:
        """The scores with every position of the sample counted: `of(score)` when those were the
        positions counted (or nothing else was recorded)."""
        other = self.token_every if score == "token" else self.gate_every
        return self.of(score) if other is None else other

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically (temporary file + rename)."""
        return atomic_write_text(path, self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> ExpertScores:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SelectionError(
                f"{path}: cannot read scores: {exc}", hint="pass a file written by `expertlib score`"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != SCORES_FORMAT:
            raise SelectionError(f"{path}: not an expertlib scores file", hint="run `expertlib score` first")
        return cls.model_validate(raw)


def check_weighting(weighting: str) -> Weighting:
    if weighting not in WEIGHTINGS:
        raise SelectionError(f"unknown weighting {weighting!r}", hint="use 'paper' or 'reference'")
    return weighting  # type: ignore[return-value]


def token_weights(count: torch.Tensor, weighting: Weighting = "paper") -> torch.Tensor:
    """(B, S) mask of counted tokens -> (B, S) float64 weight of each counted token, 0 elsewhere:
    1/L_j with the paper's weighting, 1 with the reference's pooled weighting."""
    w = count.double()
    if check_weighting(weighting) == "reference":
        return w
    return w / w.sum(dim=1, keepdim=True).clamp(min=1)


def finish_scores(
    sums: torch.Tensor, *, sequences: int, tokens: int, weighting: Weighting = "paper"
) -> list[float]:
    """One layer's accumulated weighted sums -> its scores: divided by N_s (paper), or divided by
    the counted tokens and rounded to 4 decimals like the reference's `summary.json` (reference)."""
    if check_weighting(weighting) == "reference":
        return [round(x, 4) for x in (sums / max(tokens, 1)).tolist()]
    return (sums / max(sequences, 1)).tolist()


class RoutingRecorder:
    """Accumulates weighted token and gate scores from experts pre-hooks (see `weighting`).

    Use as a context manager around forward passes; call `set_batch(count_mask)` before each
    forward with the (B, S) boolean mask of counted tokens.
    """

    def __init__(self, model: nn.Module, weighting: Weighting = "paper"):
        self.model = model
        self.weighting = check_weighting(weighting)
        self.layers = moe_layer_indices(model)
        self.num_experts = int(experts_module(model, self.layers[0]).num_experts)
        self.token = {layer: torch.zeros(self.num_experts, dtype=torch.float64) for layer in self.layers}
        self.gate = {layer: torch.zeros(self.num_experts, dtype=torch.float64) for layer in self.layers}
        self.sequences = 0
        self.tokens = 0
        self._weight: torch.Tensor | None = None  # (B*S,) token weight on counted tokens, 0 elsewhere
        self._handles: list = []

    def set_batch(self, count: torch.Tensor) -> None:
        """count: (B, S) bool. Counted tokens get weight 1/L_j (paper) or 1 (reference)."""
        lengths = count.sum(dim=1, keepdim=True)  # (B, 1)
        self._weight = token_weights(count, self.weighting).reshape(-1)  # (B*S,)
        self.sequences += int((lengths > 0).sum())
        self.tokens += int(lengths.sum())

    def _hook(self, layer: int):
        def hook(module, args, kwargs):
            top_k_index, top_k_weights = (args[1], args[2]) if len(args) >= 3 else _from_kwargs(kwargs)
            w = self._weight
            assert w is not None and top_k_index.shape[0] == w.shape[0], "set_batch() before each forward"
            k = top_k_index.shape[1]
            ids = top_k_index.reshape(-1).long()  # (T*K,)
            if self.token[layer].device != ids.device:  # counters live with their layer (GPU, device map)
                self.token[layer] = self.token[layer].to(ids.device)
                self.gate[layer] = self.gate[layer].to(ids.device)
            if w.device != ids.device:
                w = self._weight = w.to(ids.device)  # once per batch and device
            per_slot = w.repeat_interleave(k)  # (T*K,) weight of the slot's token
            self.token[layer].index_add_(0, ids, per_slot / k)
            g = top_k_weights.detach().reshape(-1).double()  # (T*K,)
            self.gate[layer].index_add_(0, ids, per_slot * g)

        return hook

    def __enter__(self) -> RoutingRecorder:
        for layer in self.layers:
            ex = experts_module(self.model, layer)
            self._handles.append(ex.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """(token, gate) scores per layer (`finish_scores`)."""
        kw = dict(sequences=self.sequences, tokens=self.tokens, weighting=self.weighting)
        token = {layer: finish_scores(t, **kw) for layer, t in self.token.items()}
        gate = {layer: finish_scores(g, **kw) for layer, g in self.gate.items()}
        return token, gate


def _from_kwargs(kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return kwargs["top_k_index"], kwargs["top_k_weights"]
    except KeyError:
        raise RuntimeError(f"experts module called with unexpected arguments {sorted(kwargs)}") from None


def budget_samples(
    samples: Sequence[Sample], budget: int | None, *, count_prompt_tokens: bool, seed: int
) -> list[tuple[Sample, int]]:
    """The scoring sample D_s: (sample, counted-token limit) pairs, shuffled with `seed`.

    Whole samples are taken until the budget is reached; the last one is cut so exactly
    `budget` tokens count (a causal model routes a prefix exactly as in the full sequence).
    """
    return list(iter_budget(samples, budget, count_prompt_tokens=count_prompt_tokens, seed=seed))


def iter_budget(
    samples: Sequence[Sample | None], budget: int | None, *, count_prompt_tokens: bool, seed: int
) -> Iterator[tuple[Sample, int]]:
    """`budget_samples` one pair at a time: touches only the samples it yields (lazy sequences,
    `expertlib.esft.data.LazySamples`, read them on demand; None items, skipped records, are passed over)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    left = budget if budget is not None else float("inf")
    for i in order.tolist():
        s = samples[i]
        if s is None:
            continue
        n = sum(counted_positions(s, count_prompt_tokens))
        if n == 0:
            continue
        take = int(min(n, left))
        yield s, take
        left -= take
        if left <= 0:
            break


def trained_positions(labels: Sequence[int]) -> list[bool]:
    """Positions whose output the loss trains: those followed by an answer token (label != -100).

    Labels are aligned with the input ids (the model shifts them), so the position that reads the
    last prompt token produces the first answer token and counts, while the answer's final token
    (usually EOS, which predicts nothing that is trained) does not. Counting answer *inputs*
    instead scored the end-of-sequence and template tokens every task shares.
    """
    return [y != IGNORE_INDEX for y in labels[1:]] + [False] if labels else []


def counted_positions(s: Sample, count_prompt_tokens: bool) -> list[bool]:
    """Which positions of `s` the scores count: all of them, or only `trained_positions`."""
    return [True] * len(s) if count_prompt_tokens else trained_positions(s.labels)


def _count_mask(
    batch: list[tuple[Sample, int]], width: int, count_prompt_tokens: bool
) -> tuple[list, torch.Tensor]:
    """Cut samples to their last counted token; (cut samples, (B, S) counted-token mask)."""
    cut, masks = [], torch.zeros((len(batch), width), dtype=torch.bool)
    for b, (s, take) in enumerate(batch):
        counted = counted_positions(s, count_prompt_tokens)
        seen, end = 0, 0
        for t, c in enumerate(counted):
            if c:
                seen += 1
                if seen == take:
                    end = t + 1
                    break
        cut.append(Sample(s.input_ids[:end], s.labels[:end], s.line))
        masks[b, :end] = torch.tensor(counted[:end], dtype=torch.bool)
    return cut, masks


@torch.no_grad()
def score_experts(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    pad_id: int,
    token_budget: int | None = PAPER_TOKEN_BUDGET,
    batch_size: int = 8,
    count_prompt_tokens: bool = True,
    seed: int = 0,
    data_digest: str | None = None,
    data_path: str | None = None,
    base: BaseIdentity | None = None,
    progress: bool = True,
    weighting: Weighting = "paper",
    every_token: bool = False,
) -> ExpertScores:
    """Run the model over the task sample (forward only) and return both ESFT scores per layer.

    `weighting`: "paper" (1/L_j per sequence) or "reference" (pooled, as deepseek-ai/ESFT).
    `every_token` (with answer-only counting): in the same forward passes, also the scores with every
    position of the same samples counted (`ExpertScores.every`)."""
    from tqdm.auto import tqdm

    from expertlib.devices import input_device

    # streaming: one batch of samples at a time; only the per-layer counters accumulate
    chosen = iter_budget(samples, token_budget, count_prompt_tokens=count_prompt_tokens, seed=seed)
    was_training = model.training
    model.eval()
    device = input_device(model)
    every = every_token and not count_prompt_tokens
    try:
        with (
            RoutingRecorder(model, weighting) as rec,
            RoutingRecorder(model, weighting) if every else contextlib.nullcontext() as rec_every,
            tqdm(
                total=token_budget, desc="scoring", unit="tok", unit_scale=True, disable=not progress
            ) as bar,
        ):
            while part := list(islice(chosen, batch_size)):
                width = max(len(s) for s, _ in part)
                cut, count = _count_mask(part, width, count_prompt_tokens)
                batch = collate(cut, pad_id)
                count = count[:, : batch["input_ids"].shape[1]]
                rec.set_batch(count)
                if rec_every is not None:
                    rec_every.set_batch(batch["attention_mask"].bool())
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,  # no KV cache: scoring is one forward per batch
                )
                bar.update(int(count.sum()))
    finally:
        model.train(was_training)
    if rec.tokens == 0:
        raise SelectionError(
            "no token to score", hint="the data has no counted tokens; try counting prompt tokens"
        )
    token, gate = rec.result()
    token_every, gate_every = rec_every.result() if rec_every is not None else (None, None)
    return ExpertScores(
        base=base or base_identity(model),
        num_experts=rec.num_experts,
        top_k=int(model.config.num_experts_per_tok),
        token=token,
        gate=gate,
        tokens_scored=rec.tokens,
        sequences=rec.sequences,
        token_budget=token_budget,
        count_prompt_tokens=count_prompt_tokens,
        data_digest=data_digest,
        data_path=data_path,
        seed=seed,
        weighting=weighting,
        token_every=token_every,
        gate_every=gate_every,
    )


def score_task(
    base: str | Path,
    data: str | Path,
    *,
    token_budget: int | None = PAPER_TOKEN_BUDGET,
    batch_size: int = 8,
    count_prompt_tokens: bool = False,
    max_length: int = 2048,
    too_long: str = "error",
    seed: int = 0,
    progress: bool = True,
    weighting: Weighting = "paper",
    device: str = "auto",
    dtype: str | None = "float32",
) -> ExpertScores:
    """Load a base model and a jsonl task file, and score every routed expert (`expertlib score`).

    The defaults are `train_esft`'s (its settings groups: answer-only positions, the paper's token
    budget, samples of at most 2048 tokens, float32). The data is read lazily (`LazySamples`):
    memory does not grow with the file. The model runs on `device` (auto: CUDA when present) in
    `dtype` (None: as stored).
    """
    from expertlib.devices import resolve_device, torch_dtype
    from expertlib.esft.data import LazySamples, data_digest, load_tokenizer, pad_token_id
    from expertlib.moe import load_model

    dev = resolve_device(device)
    on_gpu = {"device_map": {"": str(dev)}} if dev.type != "cpu" else {}  # straight to the GPU
    model = load_model(base, dtype=torch_dtype(dtype) if dtype else None, **on_gpu)
    tok = load_tokenizer(base)
    samples = LazySamples(data, tok, max_length=max_length, too_long=too_long)  # type: ignore[arg-type]
    return score_experts(
        model,
        samples,
        pad_id=pad_token_id(tok),
        token_budget=token_budget,
        batch_size=batch_size,
        count_prompt_tokens=count_prompt_tokens,
        seed=seed,
        data_digest=data_digest(data),
        data_path=str(data),
        base=base_identity(model, name=str(base)),
        progress=progress,
        weighting=weighting,
    )
