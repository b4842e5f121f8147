"""ESFT training: train only the selected routed experts, as their own parameters, and emit a patch.

The selected experts are copied into expert slots (`expertlib.slots`) that are the only
trainable tensors; every base parameter is frozen (`requires_grad=False`), so gradients and
AdamW state exist only for the slots, and weight decay can never touch a frozen row (AdamW
decays rows whose gradient is masked to zero, which is why masking is not used). Routing is
unchanged: the router still picks among the E real experts, and the remap table sends the
selected ones to their slots.

    model = load_model(base); tok = AutoTokenizer.from_pretrained(base)
    samples = load_samples("task.jsonl", tok)
    result = train_experts(model, samples, selection, TrainConfig(steps=100), pad_id=tok.pad_token_id)
    es = result.expert_set(task="math", base=base_identity(model), provenance=...)

The paper's ablations (`ExpertConfig.shared_experts`, `.non_expert_modules`) make ordinary
parameters trainable too; they travel in the patch as extra params. Those change `model`
in place; routed experts of the base never do.

The whole run from a base folder and a jsonl file (score, select, plan, train, write) is
`expertlib.esft.pipeline.train_esft`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from expertlib.devices import input_device, torch_dtype
from expertlib.errors import SelectionError
from expertlib.esft import distributed
from expertlib.esft.data import IGNORE_INDEX, Sample, collate
from expertlib.esft.selection import ExpertConfig
from expertlib.esft.state import TrainingState, has_training_state, load_training_state, save_training_state
from expertlib.identity import BaseIdentity
from expertlib.moe import (
    ExpertWeights,
    arch_spec,
    experts_module,
    moe_block,
    moe_layer_indices,
    read_expert,
    tensor_digest,
)
from expertlib.patch import ExpertSet, Provenance
from expertlib.slots import (
    active_sets,
    install_slots,
    read_slot,
    remove_slots,
    set_remap,
    slot_parameters,
    write_slot,
)

#: Row of the remap table that training uses (row 0 is the base).
TRAIN_SET_ROW = 1


#: (parameters, learning rate) that worked for ESFT: the paper's DeepSeek-V2-Lite (15.7B, 1e-5)
#: and the demo base (1.9M, 3e-3: bench/RESULTS.md "ESFT sweep"). `suggest_lr` interpolates.
LR_ANCHORS = ((1.9e6, 3e-3), (1.57e10, 1e-5))


def suggest_lr(num_params: int) -> float:
    """A starting learning rate for ESFT on a model of `num_params` parameters (log-linear, clamped).

    Small models trained for a few hundred steps need far larger steps than the paper's 16B model;
    between the two anchors `LR_ANCHORS` the rate falls log-linearly with the parameter count,
    and outside them it stays at the nearer anchor's. A starting point, not a tuned value.
    """
    (n0, lr0), (n1, lr1) = LR_ANCHORS
    t = (math.log(max(num_params, 1)) - math.log(n0)) / (math.log(n1) - math.log(n0))
    t = min(1.0, max(0.0, t))
    return float(math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0))))


class TrainConfig(BaseModel):
    """Optimisation settings.

    Paper values (ESFT.md, "Training"): lr 1e-5, AdamW betas (0.9, 0.95), weight decay 0.1,
    500 steps. Defaults that differ, and why:
    - `lr` unset: `suggest_lr` picks it from the model's size (1e-5 for the paper's 16B model, ~100x
      more for a 2M-parameter toy trained a few hundred steps); give it to override.
    - `batch_size` 8 sequences, `grad_accum` 1 (paper: 32 x 4096 tokens): sized for one small
      machine; raise them (and `max_length` in the pipeline) to match the paper.
    - `dtype` float32 (paper: bf16): exact on CPU; bfloat16 autocast is one option away.
    - `schedule` cosine, no warm-up: the paper names no schedule. The reference code
      (deepseek-ai/ESFT `train_ep.py`, `configs/base.yaml`) trains with a constant learning rate
      and no warm-up: `schedule="constant"` (CLI `--schedule constant`) reproduces it.
    - `max_grad_norm` 1.0: not in the paper; the reference's trainer clips at 1.0 too.
    """

    model_config = ConfigDict(extra="forbid")

    lr: float | None = Field(
        default=None,
        gt=0,
        description="peak learning rate; default: from the model's size (suggest_lr: the paper's 1e-5 at "
        "16B parameters, 3e-3 at the 2M-parameter demo base, log-linear in between). To pick one: train "
        "3 values ~3x apart with --eval-data and --early-stop and keep the lowest held-out loss",
    )
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW betas")
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay (trained tensors only)")
    eps: float = 1e-8
    steps: int = Field(default=500, ge=1, description="optimizer steps")
    batch_size: int = Field(default=8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="decay after warm-up; constant = the reference code's schedule"
    )
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1, description="final lr as a fraction of the peak")
    max_grad_norm: float | None = Field(default=1.0, description="gradient clipping; None disables it")
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="dtype of the frozen base weights and of compute (bfloat16: autocast); "
        "train_esft loads the base in it",
    )
    master_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="dtype of the trained experts (master weights), their gradients and AdamW state",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each layer's activations in the backward pass (less memory)"
    )
    seed: int = Field(default=0, description="seed of the sample order")
    eval_every: int = Field(default=0, ge=0, description="held-out loss every N steps (0: only at the end)")
    early_stop: int = Field(
        default=0,
        ge=0,
        description="stop after N held-out evaluations without improvement and keep the best weights (0: off)",
    )
    checkpoint_every: int = Field(default=0, ge=0, description="checkpoint every N steps (0: never)")
    mix_share: float = Field(
        default=0.25,
        ge=0,
        le=4,
        description="with --keep-mix data: kept samples added to each step, as a share of --batch-size",
    )
    mix_weight: float = Field(
        default=1.0, ge=0, description="with --keep-mix data: weight of the kept samples' mean loss"
    )
    keep_guard: float | None = Field(
        default=0.05,
        ge=0,
        le=1,
        description="with kept data (--keep): every --guard-every steps, the share of the kept samples the "
        "experts answer exactly (teacher-forced) is measured; when it falls more than this below the base's, "
        "training stops and keeps the last experts within it (1 or None: off)",
    )
    guard_every: int = Field(default=25, ge=1, description="steps between the --keep-guard measurements")
    guard_patience: int = Field(
        default=3,
        ge=1,
        description="--keep-guard measurements in a row below the guard before training stops (a dip "
        "early in training can recover); at the end, the last experts within the guard are kept",
    )

    @model_validator(mode="after")
    def _master_not_below_compute(self) -> TrainConfig:
        if self.master_dtype == "bfloat16" and self.dtype == "float32":
            raise ValueError(
                "master_dtype bfloat16 needs dtype bfloat16 (float32 compute cannot use bf16 weights)"
            )
        return self

    def with_model(self, model: nn.Module) -> TrainConfig:
        """This config with `lr` filled in from `model`'s size when it was left to the default."""
        if self.lr is not None:
            return self
        return self.model_copy(update={"lr": suggest_lr(sum(p.numel() for p in model.parameters()))})

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine/linear decay."""
        if self.lr is None:
            raise ValueError("lr is not set: call TrainConfig.with_model(model) first")
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * decay)


# --- which tensors train ----------------------------------------------------------------------------


def routed_expert_param_names(model: nn.Module) -> set[str]:
    names = set()
    modules = {id(experts_module(model, layer)) for layer in moe_layer_indices(model)}
    for mname, mod in model.named_modules():
        if id(mod) in modules:
            names |= {f"{mname}.{p}" for p, _ in mod.named_parameters(recurse=False)}
    return names


def shared_expert_param_names(model: nn.Module) -> set[str]:
    """Parameters of the shared experts (and their gate, e.g. qwen2_moe `shared_expert_gate`)."""
    attr = arch_spec(model.config.model_type).shared_attr
    if attr is None:
        return set()
    blocks = {id(moe_block(model, layer)) for layer in moe_layer_indices(model)}
    names = set()
    for mname, mod in model.named_modules():
        if id(mod) in blocks:
            names |= {f"{mname}.{p}" for p, _ in mod.named_parameters() if p.startswith(attr)}
    return names


def extra_trainable_names(model: nn.Module, selection: ExpertConfig) -> list[str]:
    """Ordinary parameters the ablation flags make trainable (never routed experts)."""
    shared = shared_expert_param_names(model)
    if selection.shared_experts and not shared:
        raise SelectionError(
            f"{model.config.model_type} has no shared experts to train", hint="drop --train-shared-experts"
        )
    routed = routed_expert_param_names(model)
    names = []
    for name, _ in model.named_parameters():
        if name in routed or ".expertlib_slots." in name:
            continue
        if (name in shared and selection.shared_experts) or (
            name not in shared and selection.non_expert_modules
        ):
            names.append(name)
    return names


@dataclass
class Trainable:
    """The slots and extra parameters being trained, and the base digests the patch records."""

    selection: ExpertConfig
    slot_of: dict[int, dict[int, int]]  # layer -> {expert: slot}
    extra_names: list[str]
    base_digests: dict[tuple[int, int], str]
    base_param_digests: dict[str, str]

    def parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything trained, in a fixed order (slots, then extras)."""
        named = dict(model.named_parameters())
        slot_ids = {id(p) for p in slot_parameters(model)}
        slots = [(n, p) for n, p in named.items() if id(p) in slot_ids]
        return slots + [(n, named[n]) for n in self.extra_names]


def prepare_trainable(
    model: nn.Module, selection: ExpertConfig, *, master_dtype: torch.dtype | None = None
) -> Trainable:
    """Freeze the base, put the selected experts into trainable slots, unfreeze the ablation extras.

    The slots live on their layer's device; with `master_dtype` (e.g. float32 over a bfloat16
    base) they hold the trained experts in that dtype (master weights; autocast computes in the
    base's dtype).
    """
    layers = moe_layer_indices(model)
    selection.check_against(layers, int(experts_module(model, layers[0]).num_experts))
    experts = {layer: ids for layer, ids in selection.experts.items() if ids}
    if not experts and not (selection.shared_experts or selection.non_expert_modules):
        raise SelectionError("the expert selection is empty: nothing to train")
    extra = extra_trainable_names(model, selection)
    named = dict(model.named_parameters())
    base_param_digests = {n: tensor_digest(named[n]) for n in extra}
    base_digests = {
        (layer, e): read_expert(model, layer, e).digest() for layer, ids in experts.items() for e in ids
    }
    for p in model.parameters():
        p.requires_grad_(False)
    slot_of = {layer: {e: i for i, e in enumerate(ids)} for layer, ids in experts.items()}
    if slot_of:
        install_slots(model, {layer: len(m) for layer, m in slot_of.items()}, max_sets=1, trainable=True)
        for layer, m in slot_of.items():
            for e, slot in m.items():
                write_slot(model, layer, slot, read_expert(model, layer, e))
            set_remap(model, TRAIN_SET_ROW, layer, m)
        if master_dtype is not None:
            for p in slot_parameters(model):
                p.data = p.data.to(master_dtype)
    for n in extra:
        named[n].requires_grad_(True)
    return Trainable(selection, slot_of, extra, base_digests, base_param_digests)


# --- the loop ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What training produced: trained experts and extras (canonical form), losses, timing."""

    experts: dict[tuple[int, int], ExpertWeights]
    extra_params: dict[str, torch.Tensor]
    trainable: Trainable
    config: TrainConfig
    steps: int
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    trainable_params: int = 0
    guard: dict | None = None  # the keep guard's record (`train_experts`), None when it did not run

    @property
    def final_train_loss(self) -> float | None:
        return self.train_losses[-1] if self.train_losses else None

    @property
    def final_eval_loss(self) -> float | None:
        return self.eval_losses[-1][1] if self.eval_losses else None

    def expert_set(
        self,
        *,
        task: str,
        base: BaseIdentity,
        provenance: Provenance | None = None,
        dtype: torch.dtype | None = None,
        description: str = "",
    ) -> ExpertSet:
        """The patch: trained experts (+ extras), base digests, provenance with the training record."""
        prov = (provenance or Provenance()).model_copy(
            update=dict(
                train_shared_experts=self.trainable.selection.shared_experts,
                train_non_expert_modules=self.trainable.selection.non_expert_modules,
                training=self.config.model_dump(mode="json"),
                steps=self.steps,
                final_train_loss=self.final_train_loss,
                final_eval_loss=self.final_eval_loss,
                wall_time_s=round(self.wall_time_s, 3),
                trainable_params=self.trainable_params,
            )
        )
        return ExpertSet.build(
            task=task,
            base=base,
            experts=self.experts,
            base_digests=self.trainable.base_digests,
            extra_params=self.extra_params,
            base_param_digests=self.trainable.base_param_digests,
            provenance=prov,
            description=description,
            dtype=dtype,
        )


def batch_indices(step: int, micro: int, config: TrainConfig, n: int) -> list[int]:
    """Sample indices of micro-batch `micro` of step `step`: seeded epoch permutations, a pure function."""
    per_step = config.batch_size * config.grad_accum
    start = step * per_step + micro * config.batch_size
    out = []
    for i in range(start, start + config.batch_size):
        epoch, pos = divmod(i, n)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def mix_batch(step: int, config: TrainConfig, samples: Sequence[Sample], world_size: int = 1) -> list[Sample]:
    """Kept samples of step `step` (`--keep-mix`): round(mix_share x batch_size) per process, seeded epochs."""
    per = max(1, round(config.mix_share * config.batch_size)) * world_size
    cfg = config.model_copy(update={"batch_size": per, "grad_accum": 1, "seed": config.seed + 7919})
    return [samples[i] for i in batch_indices(step, 0, cfg, len(samples))]


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig) -> torch.Tensor:
    """Summed next-token cross-entropy over trained labels of one batch."""
    device = input_device(model)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, S, V)
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:].to(logits.device)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def n_labels(samples: Sequence[Sample]) -> int:
    return sum(sum(1 for y in s.labels[1:] if y != IGNORE_INDEX) for s in samples)


@torch.no_grad()
def evaluate(model: nn.Module, samples: Sequence[Sample], *, pad_id: int, config: TrainConfig) -> float:
    """Mean per-token cross-entropy on `samples` (with the training set active when slots exist)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with active_sets(model, TRAIN_SET_ROW) if hasattr(model, "_expertlib_active") else nullcontext():
            for i in range(0, len(samples), config.batch_size):
                part = samples[i : i + config.batch_size]
                total += float(loss_sum(model, collate(part, pad_id), config))
                count += n_labels(part)
    finally:
        model.train(was)
    return total / max(count, 1)


def train_experts(
    model: nn.Module,
    samples: Sequence[Sample],
    selection: ExpertConfig,
    config: TrainConfig,
    *,
    pad_id: int,
    eval_samples: Sequence[Sample] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    run_key: dict | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    mix_samples: Sequence[Sample] = (),
    guard_samples: Sequence[Sample] = (),
) -> TrainResult:
    """Train the selected experts of `model` on `samples`; returns the trained tensors and the record.

    With `checkpoint_dir`, the trainable tensors, AdamW state, RNG state and loss history are
    written there every `config.checkpoint_every` steps; `resume=True` continues from the latest
    checkpoint and gives exactly the result of an uninterrupted run. `run_key` (data digest,
    base identity, ...) must match the checkpoint's. On return the slots are removed from
    `model` and every parameter's `requires_grad` is as it was.

    With `mix_samples` (skills to keep, `--keep-mix`), every step also trains on
    round(`mix_share` x batch_size) of them: loss = task mean loss + `mix_weight` x their mean
    loss, so the task's own signal keeps its scale and the kept answers pull the experts back.

    With `guard_samples` (the kept data, `--keep`) and `config.keep_guard`, the share of them the
    model answers exactly (teacher-forced; the share of answer tokens where answers are longer than
    `LONG_ANSWER_TOKENS`, as the base's own samples) is measured on the base first, then every
    `config.guard_every` steps with the trained experts; once it has been more than `keep_guard`
    below the base's `config.guard_patience` times in a row (or is below at the last step), training
    stops and the experts go back to the last measurement within it (step 0:
    the base's own). `TrainResult.guard` records the figures.
    """
    from tqdm.auto import tqdm

    if not samples:
        raise SelectionError("no training samples")
    config = config.with_model(model)
    torch.manual_seed(config.seed)
    dist = distributed.context()
    # each step's global batch: batch_size sequences per process (the same as one process with
    # batch_size x world_size); every process picks the global indices and trains on its share
    global_cfg = config.model_copy(update={"batch_size": config.batch_size * dist.world_size})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        trainable = prepare_trainable(model, selection, master_dtype=torch_dtype(config.master_dtype))
    except BaseException:
        _restore_flags(model, flags)
        raise
    try:
        params = trainable.parameters(model)
        opt = torch.optim.AdamW(
            [p for _, p in params],
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            eps=config.eps,
        )
        n_trainable = sum(p.numel() for _, p in params)
        key = {"selection": selection.to_reference(), "config": _key_config(config), **(run_key or {})}
        state = TrainingState()
        if resume and checkpoint_dir is not None and has_training_state(checkpoint_dir):
            state = load_training_state(checkpoint_dir, params, opt, key)
        t0 = time.perf_counter() - state.wall_time_s
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        best: tuple[float, list[torch.Tensor]] | None = None  # early stopping: (loss, weights)
        stale = 0
        guarded = guard_samples and config.keep_guard is not None and config.keep_guard < 1
        guard = _KeepGuard(model, guard_samples, pad_id, config, params, state.step) if guarded else None
        model.train()
        with (
            active_sets(model, TRAIN_SET_ROW) if trainable.slot_of else nullcontext(),
            tqdm(total=config.steps, initial=state.step, desc="training", disable=not progress) as bar,
        ):
            for step in range(state.step, config.steps):
                lr = config.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                micro = [
                    [samples[i] for i in batch_indices(step, m, global_cfg, len(samples))]
                    for m in range(config.grad_accum)
                ]
                n_tokens = max(1, sum(n_labels(mb) for mb in micro))  # of the global batch
                loss_value = 0.0
                for mb in micro:
                    loss = loss_sum(model, collate(dist.shard(mb), pad_id), config) / n_tokens
                    loss.backward()
                    loss_value += float(loss.detach())
                if mix_samples and config.mix_share and config.mix_weight:
                    mixed = mix_batch(step, config, mix_samples, dist.world_size)
                    mix_loss = loss_sum(model, collate(dist.shard(mixed), pad_id), config)
                    (mix_loss * (config.mix_weight / max(1, n_labels(mixed)))).backward()
                if dist.enabled:
                    distributed.all_reduce_gradients([p for _, p in params])
                    loss_value = distributed.all_reduce_sum(loss_value)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                state.step = step + 1
                state.train_losses.append(loss_value)
                postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}"}
                if eval_samples and config.eval_every and state.step % config.eval_every == 0:
                    state.eval_losses.append(
                        (state.step, evaluate(model, eval_samples, pad_id=pad_id, config=config))
                    )
                    postfix["eval"] = f"{state.eval_losses[-1][1]:.4f}"
                    if config.early_stop:
                        if best is None or state.eval_losses[-1][1] < best[0]:
                            best = (state.eval_losses[-1][1], [p.detach().clone() for _, p in params])
                            stale = 0
                        else:
                            stale += 1
                bar.set_postfix(postfix)
                bar.update(1)
                if (
                    checkpoint_dir is not None
                    and dist.is_main
                    and config.checkpoint_every
                    and state.step % config.checkpoint_every == 0
                ):
                    state.wall_time_s = time.perf_counter() - t0
                    save_training_state(checkpoint_dir, params, opt, state, key)
                if on_step is not None:
                    on_step(state.step, loss_value)
                if config.early_stop and stale >= config.early_stop:
                    break
                if guard is not None and not guard.holds(state.step, last=state.step == config.steps):
                    break
        if best is not None and (stale or state.eval_losses[-1][1] > best[0]):
            with torch.no_grad():  # early stopping keeps the weights of the best held-out loss
                for (_, p), w in zip(params, best[1], strict=True):
                    p.copy_(w)
            state.eval_losses.append((state.step, best[0]))
        if eval_samples and (not state.eval_losses or state.eval_losses[-1][0] != state.step):
            state.eval_losses.append(
                (state.step, evaluate(model, eval_samples, pad_id=pad_id, config=config))
            )
        experts = {
            (layer, e): read_slot(model, layer, slot)
            for layer, m in trainable.slot_of.items()
            for e, slot in m.items()
        }
        named = dict(model.named_parameters())
        extras = {n: named[n].detach().clone() for n in trainable.extra_names}
        return TrainResult(
            experts=experts,
            extra_params=extras,
            trainable=trainable,
            config=config,
            steps=state.step,
            train_losses=state.train_losses,
            eval_losses=state.eval_losses,
            wall_time_s=time.perf_counter() - t0,
            trainable_params=n_trainable,
            guard=guard.record() if guard is not None else None,
        )
    finally:
        model.eval()
        if config.gradient_checkpointing and getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        if trainable.slot_of:
            remove_slots(model)
        _restore_flags(model, flags)


class _KeepGuard:
    """The keep guard of `train_experts`: the kept samples' teacher-forced score, measured on
    the base (slots inactive) at construction, then with the trained experts; the weights of the
    last measurement within `keep_guard` of the base are kept, and restored when one falls below."""

    def __init__(self, model, samples, pad_id: int, config: TrainConfig, params, start: int = 0) -> None:
        from expertlib.esft.keep import LONG_ANSWER_TOKENS

        self.model, self.samples, self.pad_id, self.config = model, list(samples), pad_id, config
        self.params = [p for _, p in params]
        answer = sum(s.num_answer_tokens for s in self.samples) / max(1, len(self.samples))
        self.long = answer > LONG_ANSWER_TOKENS
        self.base = self._measure()
        # the weights it starts from (the base's copies, or those a resumed run reached) count as within
        self.good = (start, self.base, [p.detach().clone() for p in self.params])
        self.stopped: tuple[int, float] | None = None
        self.falls = 0  # measurements in a row below the guard

    def _measure(self) -> float:
        """Exact match; token accuracy where the kept answers are long (the base's own samples: one
        changed token of 48 is drift, not a lost skill)."""
        from expertlib.esft.keep import _forced

        was = self.model.training
        self.model.eval()
        try:
            exact, tokens = _forced(self.model, self.samples, self.pad_id)
        finally:
            self.model.train(was)
        return tokens if self.long else exact

    def holds(self, step: int, *, last: bool = False) -> bool:
        """Measure at every `guard_every` steps (and the last). False, with the last weights within the
        guard restored, after `guard_patience` measurements in a row below it, or at the last step
        when that one is below it."""
        if not (last or step % self.config.guard_every == 0):
            return True
        now = self._measure()
        if now >= self.base - self.config.keep_guard:
            self.good, self.falls = (step, now, [p.detach().clone() for p in self.params]), 0
            return True
        self.falls += 1
        if self.falls < self.config.guard_patience and not last:
            return True
        self.stopped = (step, now)
        with torch.no_grad():
            for p, w in zip(self.params, self.good[2], strict=True):
                p.copy_(w)
        return False

    def record(self) -> dict:
        out = {
            "guard": self.config.keep_guard,
            "measure": "token accuracy" if self.long else "exact match",
            "base_exact": round(self.base, 4),
            "kept_step": self.good[0],
            "kept_exact": round(self.good[1], 4),
        }
        if self.stopped is not None:
            out.update(stopped_step=self.stopped[0], stopped_exact=round(self.stopped[1], 4))
        return out


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))


def _key_config(config: TrainConfig) -> dict:
    """Config fields that must match to resume (how often to evaluate or checkpoint may change)."""
    return config.model_dump(
        mode="json", exclude={"eval_every", "checkpoint_every", "gradient_checkpointing"}
    )
