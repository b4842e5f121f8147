"""The whole ESFT run (`expertlib train`): read the data, score, select, plan memory, train, write the patch.

`train_esft` takes its settings in four groups, each a pydantic model with a description per
field (the CLI's options are generated from them, as they are from `TrainConfig`):

    DataConfig       how the task's jsonl becomes samples (length limit, packing, held-out data)
    SelectionConfig  which experts train: scored (ESFT-Token / ESFT-Gate, top-p) or given
    TrainConfig      the optimisation (`expertlib.esft.training`)
    RuntimeConfig    where the run executes and how it can be resumed; not what it trains

    es = train_esft(
        "./base", "math.jsonl", task="math", out="math.safetensors",
        selection=SelectionConfig(score="gate", top_p=0.1),
        config=TrainConfig(lr=1e-4, steps=200),
        data_config=DataConfig(max_length=1024, holdout=0.05),
        runtime=RuntimeConfig(device="cuda", checkpoint_dir="ckpt"),
    )
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from expertlib.devices import resolve_device, torch_dtype
from expertlib.errors import SelectionError
from expertlib.esft import distributed
from expertlib.esft.data import Sample, TooLong
from expertlib.esft.keep import AUTO
from expertlib.esft.memory_plan import MemoryPlan, plan_training
from expertlib.esft.scoring import PAPER_TOKEN_BUDGET
from expertlib.esft.selection import DEFAULT_KEEP_MODE, DEFAULT_KEEP_SHARE, ExpertConfig, KeepMode
from expertlib.esft.training import Trainable, TrainConfig, train_experts
from expertlib.identity import load_config
from expertlib.moe import tensor_digest
from expertlib.patch import ExpertSet, Provenance
from expertlib.shape import ModelShape


class DataConfig(BaseModel):
    """How the task's jsonl becomes training (and held-out) samples (`expertlib.esft.data`)."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(
        default=2048,
        ge=1,
        description="longest sample in tokens (a longer one is refused unless --too-long says)",
    )
    too_long: TooLong = Field(default="error", description="what to do with samples longer than --max-length")
    pack: bool = Field(default=False, description="pack samples into rows of --max-length tokens")
    holdout: float = Field(default=0.0, description="fraction of the data held out for the eval loss")
    eval_data: Path | None = Field(default=None, description="held-out jsonl instead of --holdout")
    keep_mix: tuple[Path, ...] = Field(
        default=(),
        description="data of skills the set must keep doing (e.g. its domain's pretrained tasks), mixed "
        "into every step (--mix-share of the batch, loss weight --mix-weight); repeatable",
    )


class SelectionConfig(BaseModel):
    """Which experts train: scored on the training split and selected per layer with the top-p
    rule (`expertlib.esft.scoring`, `expertlib.esft.selection`), or a given selection."""

    model_config = ConfigDict(extra="forbid")

    score: Literal["token", "gate"] = Field(default="token", description="ESFT-Token or ESFT-Gate scores")
    top_p: float | None = Field(default=None, description="selection threshold (default 0.2 token, 0.1 gate)")
    max_per_layer: int | None = Field(default=None, description="cap on selected experts per layer")
    experts: Path | ExpertConfig | None = Field(
        default=None, description="a selection (expert_cfg.json or ExpertConfig): no scoring"
    )
    token_budget: int | None = Field(
        default=PAPER_TOKEN_BUDGET,
        ge=0,
        description=f"tokens in the scoring sample (the paper's {PAPER_TOKEN_BUDGET}); 0 scores every token",
    )
    count_prompt_tokens: bool = Field(
        default=False,
        description="prompt tokens count in the scores too (default: only the positions that produce answers)",
    )
    keep: tuple[str, ...] = Field(
        default=(AUTO,),
        description="data whose routing the selection must leave alone: a jsonl, 'builtin' (the demo's "
        "general tasks), 'self' (prompts and answers sampled from the base, cached), 'auto' (builtin on the "
        "demo base, else self) or 'none' (the paper's selection); repeatable",
    )
    keep_mode: KeepMode = Field(
        default=DEFAULT_KEEP_MODE,
        description="contrast: rank experts by task share minus kept share (the most kept share counts) "
        "and apply top-p to that; capped: the same ranking, taking experts only while the layer stays within "
        "--keep-share of each kept dataset's routing (one past it is replaced by the next under it); capped-wide: "
        "capped, going on within the bound up to the paper's count of experts per layer (every token scored); budget: the "
        "paper's selection, dropping experts until they carry at most --keep-share of the kept routing per layer",
    )
    keep_share: float = Field(
        default=DEFAULT_KEEP_SHARE,
        gt=0,
        le=1,
        description="most of a kept dataset's routing per layer to train",
    )
    weighting: Literal["paper", "reference"] = Field(
        default="paper",
        description="paper: every sequence weighs the same (1/L_j, the paper's formula); reference: all "
        "tokens pooled, scores per layer divided by the token count and rounded to 4 decimals, as the "
        "deepseek-ai/ESFT code (reproduces its expert configs)",
    )
    train_shared_experts: bool = Field(default=False, description="also train shared experts (ablation)")
    train_non_expert_modules: bool = Field(
        default=False, description="also train attention/norms/embeddings (ablation)"
    )


class RuntimeConfig(BaseModel):
    """Where the run executes and how it can be resumed; none of it changes which tensors train
    or the recipe that trains them."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(
        default="auto", description="where to run: auto (CUDA when present), cpu, cuda or cuda:N"
    )
    device_map: str | None = Field(
        default=None,
        description="spread the frozen base over all GPUs with accelerate (auto, balanced) instead of --device",
    )
    checkpoint_dir: Path | None = Field(default=None, description="write resumable training state here")
    resume: bool = Field(default=False, description="continue from the state in --checkpoint-dir")
    progress: bool = Field(default=True, description="progress bars")
    fit_check: bool = Field(
        default=True,
        description="after training, measure how many training and held-out answers the set gets right and "
        "record it (says when the set falls short, and why)",
    )


def train_esft(
    base: str | Path,
    data: str | Path,
    *,
    task: str,
    out: str | Path | None = None,
    description: str = "",
    selection: SelectionConfig | None = None,
    config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
    runtime: RuntimeConfig | None = None,
    on_selection: Callable[[nn.Module, ExpertConfig, Sequence[Sample]], dict | None] | None = None,
    on_plan: Callable[[MemoryPlan, int, str], None] | None = None,
) -> ExpertSet:
    """Score, select and train one task's experts on a base model; return (and save) the patch.

    `on_selection(model, experts, train_samples)` runs after selection, before training (the
    CLI's retention-risk check, `expertlib.esft.diagnostics`); it must leave the model unchanged.
    What it returns (a dict, e.g. {"retention_risk": ...}) is kept in the manifest's `provenance.extra`.

    Without `selection.experts`, the routed experts are scored on the training split
    (ESFT-`score`, `token_budget` tokens; 0 or None = all) and selected with the top-p rule (`top_p`
    defaults to the paper's 0.2 for token, 0.1 for gate). `weighting` is the scoring's ("paper"
    or the reference code's pooled "reference", `expertlib.esft.scoring`). The patch is written
    atomically to `out`.

    `runtime.device` (auto, cpu, cuda, cuda:N) is where the model runs, loaded in `config.dtype`;
    `runtime.device_map` ("auto", "balanced", ...) spreads the frozen base over all GPUs with
    accelerate instead. Before loading, and again once the selection is known, the memory plan
    (`expertlib.esft.memory_plan`) is passed to `on_plan(plan, capacity_bytes, device)` and checked:
    a run that cannot fit raises DeviceError with suggestions. Under torchrun / accelerate
    launch the processes train data-parallel (`expertlib.esft.distributed`); rank 0 writes the patch.
    """
    from expertlib.esft.data import data_digest, load_samples, load_tokenizer, pad_token_id, split_holdout
    from expertlib.esft.profiling import anchor_samples, base_anchors, prompt_profile
    from expertlib.esft.scoring import score_experts
    from expertlib.esft.selection import select_experts, top_p_layer, top_p_rule
    from expertlib.identity import base_identity
    from expertlib.moe import load_model

    sel = selection or SelectionConfig()
    config = config or TrainConfig()
    dc = data_config or DataConfig()
    rt = runtime or RuntimeConfig()
    dev = resolve_device(rt.device)
    dist = distributed.init(dev)
    base_cfg = load_config(base)
    shape = ModelShape.from_config(base_cfg)
    given = ExpertConfig.load(sel.experts) if isinstance(sel.experts, Path) else sel.experts
    planned = partial(
        _check_plan,
        base_cfg,
        shape=shape,
        config=config,
        device=dev,
        device_map=rt.device_map,
        on_plan=on_plan,
        extra=sel.train_shared_experts or sel.train_non_expert_modules,
    )
    tok = load_tokenizer(base)  # data before the model: bad data fails fast, the plan knows the lengths
    pad = pad_token_id(tok)
    digest = data_digest(data)
    read = partial(load_samples, tokenizer=tok, max_length=dc.max_length, too_long=dc.too_long, pack=dc.pack)
    samples = read(data)
    if dc.eval_data is not None:
        train_s, eval_s = samples, read(dc.eval_data)
    else:
        train_s, eval_s = split_holdout(samples, dc.holdout, config.seed)
    mix_s = [x for path in dc.keep_mix for x in read(path, too_long="truncate")]
    longest = min(dc.max_length, max(len(x) for x in train_s))  # a batch pads to its longest sample
    if given is not None:
        planned(given.num_experts, longest)
    else:  # selection unknown until scoring: assume a quarter of each layer (ESFT trains 5-15%)
        per_layer = min(
            shape.num_experts, sel.max_per_layer or max(shape.top_k, math.ceil(shape.num_experts / 4))
        )
        planned(per_layer * len(shape.moe_layers), longest)
    patch_dtype = checkpoint_dtype(base_cfg)
    kw = (
        {"device_map": rt.device_map}
        if rt.device_map
        else {"device_map": {"": str(dev)}}
        if dev.type != "cpu"
        else {}
    )
    model = load_model(base, dtype=torch_dtype(config.dtype), **kw)
    ident = base_identity(model, name=str(base))
    prov = Provenance(
        data_digest=digest,
        selection=sel.model_dump(mode="json"),
        data=dc.model_dump(mode="json"),
        extra={"data_path": str(data)},
    )
    if given is None:
        p, eps = top_p_rule(sel.score, sel.top_p, sel.weighting)
        scores = score_experts(
            model,
            train_s,
            pad_id=pad,
            token_budget=sel.token_budget or None,
            batch_size=config.batch_size,
            count_prompt_tokens=sel.count_prompt_tokens,
            seed=config.seed,
            data_digest=digest,
            base=ident,
            progress=rt.progress,
            weighting=sel.weighting,
            every_token=True,  # capped-wide's count: the paper's, every token scored
        )
        rule = partial(
            select_experts,
            scores.of(sel.score),
            p,
            max_per_layer=sel.max_per_layer,
            shared_experts=sel.train_shared_experts,
            non_expert_modules=sel.train_non_expert_modules,
            eps=eps,
            count_scores=scores.every(sel.score),
        )
        experts, keep_record, kept_s = _keep_aware(rule, sel, base, model, tok, pad, scores.token)
        prov = prov.model_copy(
            update=dict(
                method=f"esft-{sel.score}",
                score_function=sel.score,
                top_p=p,
                max_experts_per_layer=sel.max_per_layer,
                token_budget=sel.token_budget,
                tokens_scored=scores.tokens_scored,
                count_prompt_tokens=sel.count_prompt_tokens,
                extra={
                    **prov.extra,
                    "keep": keep_record,
                    "weighting": sel.weighting,
                    "scores": {str(k): [round(x, 6) for x in v] for k, v in scores.of(sel.score).items()},
                    # the paper's top-p count per layer, every token scored (what capped-wide fills to)
                    "paper_count": {
                        str(k): len(top_p_layer(v, p, max_experts=sel.max_per_layer, eps=eps))
                        for k, v in scores.every(sel.score).items()
                    },
                },
            )
        )
    else:
        kept_s = []
        experts = given.model_copy(
            update=dict(
                shared_experts=given.shared_experts or sel.train_shared_experts,
                non_expert_modules=given.non_expert_modules or sel.train_non_expert_modules,
            )
        )
        prov = prov.model_copy(
            update=dict(method="esft", extra={**prov.extra, "selection_from": str(sel.experts)})
        )
    # the prompts' routing under the base, for the server's model="auto" (expertlib.profile)
    # and the base anchors: what the base already does, which keeps its own prompts on the base
    anchors = base_anchors(model, anchor_samples(base, model, tok, keep=sel.keep), pad_id=pad)
    prov = prov.model_copy(
        update={"routing_profile": prompt_profile(model, train_s, pad_id=pad), "base_anchors": anchors}
    )
    if on_selection is not None:
        found = on_selection(model, experts, train_s)
        if found:  # kept with the set (the retention risk: `expertlib show`, the web view's set page)
            prov.extra.update(found)
    moe_sel = [layer for layer, ids in experts.experts.items() if ids]
    planned(
        experts.num_experts,
        longest,
        first_trained_layer=min(moe_sel) if moe_sel else None,
    )
    run_key = {
        "data_digest": digest,
        "eval_data": data_digest(dc.eval_data) if dc.eval_data is not None else dc.holdout,
        "base": ident.config_digest,
        "max_length": dc.max_length,
        "pack": dc.pack,
        "keep_mix": [data_digest(x) for x in dc.keep_mix],
    }
    result = train_experts(
        model,
        train_s,
        experts,
        config,
        pad_id=pad,
        eval_samples=eval_s,
        checkpoint_dir=rt.checkpoint_dir,
        resume=rt.resume,
        run_key=run_key,
        progress=rt.progress,
        mix_samples=mix_s,
        guard_samples=kept_s,
    )
    if result.guard is not None:
        prov.extra["keep_guard"] = result.guard
    prov.extra["eval_losses"] = [[s, round(v, 6)] for s, v in result.eval_losses]
    if mix_s:
        prov.extra["keep_mix"] = [{"path": str(x), "digest": data_digest(x)} for x in dc.keep_mix]
    if next(model.parameters()).dtype != patch_dtype:
        _digests_from_checkpoint(base, result.trainable)
    es = result.expert_set(task=task, base=ident, provenance=prov, dtype=patch_dtype, description=description)
    if rt.fit_check and not result.extra_params:  # ablations change the model itself: no base to compare
        from expertlib.esft.keep import fit_check

        dropped = (prov.extra.get("keep") or {}).get("dropped_task_share", {})
        fit = fit_check(model, es, train_s, eval_s, pad_id=pad, dropped=dropped)
        prov.extra["fit"] = fit.model_dump()
        es = result.expert_set(
            task=task, base=ident, provenance=prov, dtype=patch_dtype, description=description
        )
    if out is not None and dist.is_main:
        es.save(out)
    distributed.barrier()
    return es


def settings_of(es: ExpertSet) -> tuple[SelectionConfig, DataConfig, TrainConfig]:
    """The settings groups that trained `es`, read back from its provenance: `train_esft` with them
    (and the same base and data) trains the set again (`expertlib train --from SET`)."""
    prov = es.manifest.provenance
    if not (prov.selection and prov.data and prov.training):
        raise SelectionError(
            f"the expert set {es.manifest.task!r} does not record the settings that trained it",
            hint="sets trained before expertlib recorded every settings group cannot be retrained with "
            "--from; train it again with its options",
        )
    return (
        SelectionConfig.model_validate(prov.selection),
        DataConfig.model_validate(prov.data),
        TrainConfig.model_validate(prov.training),
    )


def _keep_aware(
    rule: Callable[..., ExpertConfig],
    sel: SelectionConfig,
    base: str | Path,
    model: nn.Module,
    tokenizer,
    pad: int,
    task: dict[int, list[float]],
) -> tuple[ExpertConfig, dict | None, list[Sample]]:
    """The selection under `sel.keep` (`expertlib.esft.keep`), what the manifest records of it
    (each kept source, the share of its routing the selection carries per layer, and the experts
    and task routing share the keep constraint dropped) and the kept samples (for the training's
    keep guard). With nothing kept: the paper's rule."""
    from expertlib.esft.keep import kept_routing, resolve_keep

    kept = resolve_keep(sel.keep, base, model, tokenizer)
    if not kept:
        return rule(), None, []
    shares = [kept_routing(model, k.samples, pad_id=pad) for k in kept]
    paper = rule()
    experts = rule(keep=shares, keep_mode=sel.keep_mode, keep_share=sel.keep_share)
    fallback = experts.num_experts == 0 and all(str(name) == AUTO for name in sel.keep)
    if fallback:  # kept by default, not by request: train the paper's set, and the record says so
        experts = paper
    elif experts.num_experts == 0:  # the task routes only through what the kept data uses
        mass = max(
            sum(sh[layer][e] for e in ids) / (sum(sh[layer]) or 1.0)
            for sh in shares
            for layer, ids in paper.experts.items()
        )
        raise SelectionError(
            f"every expert the task routes through carries kept routing: the paper's selection would retrain "
            f"up to {mass:.2f} of {', '.join(k.name for k in kept)}'s routing in a layer, and "
            + (
                f"no expert stays under --keep-share {sel.keep_share}"
                if sel.keep_mode == "budget"
                else "the kept data uses every expert the task uses at least as much as the task does"
            )
            + ". ESFT cannot learn this task here without costing the kept skills",
            hint="the trade-off is yours: --keep none trains the paper's selection (the kept skills will suffer), "
            "--keep-share raises the budget, --keep-mix DATA rehearses the kept skills while training",
        )

    def carried(layer: int, ids: list[int], s: dict[int, list[float]]) -> float:
        return round(sum(s[layer][e] for e in ids) / (sum(s[layer]) or 1.0), 4)

    dropped = {layer: sorted(set(ids) - set(experts.experts[layer])) for layer, ids in paper.experts.items()}
    record = {
        "sources": [
            {"name": k.name, "kind": k.kind, "digest": k.digest, "samples": len(k.samples)} for k in kept
        ],
        "mode": sel.keep_mode,
        "share": sel.keep_share,
        "fallback": fallback,
        "kept_share": {
            str(layer): [carried(layer, ids, s) for s in shares] for layer, ids in experts.experts.items()
        },
        "paper_kept_share": {
            str(layer): [carried(layer, ids, s) for s in shares] for layer, ids in paper.experts.items()
        },
        "dropped": {str(layer): ids for layer, ids in dropped.items() if ids},
        "dropped_task_share": {
            str(layer): carried(layer, ids, task) for layer, ids in dropped.items() if ids
        },
    }
    return experts, record, [x for k in kept for x in k.samples]


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the base is stored in (the patch's dtype); float32 when the config names none."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def _check_plan(
    base_cfg,
    trained_experts: int,
    seq_len: int,
    *,
    shape: ModelShape,
    config: TrainConfig,
    device: torch.device,
    device_map: str | None,
    on_plan: Callable[[MemoryPlan, int, str], None] | None,
    extra: bool,
    first_trained_layer: int | None = None,
) -> MemoryPlan:
    """Plan the run's memory, report it, and refuse it when it cannot fit the device(s)."""
    from expertlib.devices import device_capacity

    plan = plan_training(
        base_cfg,
        trained_experts=trained_experts,
        batch_size=config.batch_size,
        seq_len=seq_len,
        dtype=config.dtype,
        master_dtype=config.master_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
        first_trained_layer=0 if extra else first_trained_layer,
        shape=shape,
    )
    if device_map and torch.cuda.is_available():
        n = torch.cuda.device_count()
        capacity, where = sum(device_capacity(f"cuda:{i}") for i in range(n)), f"{n} GPUs"
    else:
        capacity, where = device_capacity(device), str(device)
    if on_plan is not None:
        on_plan(plan, capacity, where)
    plan.check(capacity, device=where)
    return plan


def _digests_from_checkpoint(base: str | Path, trainable: Trainable) -> None:
    """Base digests as stored on disk, when the base was loaded in another dtype (e.g. fp32 -> bf16)."""
    from expertlib.checkpoint import BaseCheckpoint

    if not Path(base).is_dir():
        return  # a hub id: the digests of the loaded (cast) weights stand
    ck = BaseCheckpoint(base)
    trainable.base_digests = {key: ck.expert_digest(*key) for key in trainable.base_digests}
    trainable.base_param_digests = {n: tensor_digest(ck.tensor(n)) for n in trainable.base_param_digests}
