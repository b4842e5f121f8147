"""`expertlib score`, `expertlib select`, `expertlib train`: the ESFT pipeline from the shell."""

from __future__ import annotations

from pathlib import Path

import click

from expertlib.cli.options import field_option, field_options, take
from expertlib.cli.output import emit, json_option, print_table
from expertlib.esft.pipeline import DataConfig, RuntimeConfig, SelectionConfig
from expertlib.esft.training import TrainConfig

general_option = click.option(
    "--general",
    default=None,
    help="General reference data (jsonl, or 'builtin' for the demo's general tasks): report per layer how "
    "much of its routing the selected experts carry, and warn when training them risks general ability.",
)
#: `--budget N` (0: every token): SelectionConfig.token_budget, in `score` and `train`
budget_option = field_option(SelectionConfig, "token_budget", "--budget")
#: `--all-tokens/--answer-only`: SelectionConfig.count_prompt_tokens, in `score` and `train`
tokens_option = field_option(SelectionConfig, "count_prompt_tokens", "--all-tokens/--answer-only")
#: `--train-shared-experts`, `--train-non-expert-modules` (`select` once spelled them without "train")
ablation_options = [
    field_option(SelectionConfig, "train_shared_experts", aliases=("--shared-experts",)),
    field_option(SelectionConfig, "train_non_expert_modules", aliases=("--non-expert-modules",)),
]


def _stack(*decorators):
    def decorate(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return decorate


def _print_plan(plan, capacity: int, where: str) -> None:
    """The memory plan, on stderr, before the run starts (`expertlib.esft.memory_plan`)."""
    from expertlib.esft.memory_plan import HEADROOM
    from expertlib.sizing import format_bytes

    click.echo(
        f"memory plan on {where} ({format_bytes(capacity)}, {HEADROOM:.0%} usable):\n{plan.render()}",
        err=True,
    )


@click.command("score")
@click.argument("base")
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Scores JSON to write.")
@budget_option
@field_options(TrainConfig, "batch_size")
@tokens_option
@field_options(DataConfig, "max_length", "too_long")
@field_options(TrainConfig, "seed")
@field_options(SelectionConfig, "weighting")
@general_option
@field_options(RuntimeConfig, "device")
@field_options(TrainConfig, "dtype")
@json_option
def score_cmd(
    base,
    data,
    out,
    token_budget,
    batch_size,
    count_prompt_tokens,
    max_length,
    too_long,
    seed,
    weighting,
    general,
    device,
    dtype,
    as_json,
) -> None:
    """Score every routed expert of BASE on task DATA (jsonl) with ESFT-Token and ESFT-Gate.

    Example: expertlib score ./base math.jsonl --out math.scores.json --budget 131072
    """
    from expertlib.esft.scoring import score_task

    scores = score_task(
        base,
        data,
        token_budget=token_budget or None,
        batch_size=batch_size,
        count_prompt_tokens=count_prompt_tokens,
        max_length=max_length,
        too_long=too_long,
        seed=seed,
        weighting=weighting,
        device=device,
        dtype=dtype,
    )
    scores.save(out)
    summary = {
        "out": out,
        "tokens_scored": scores.tokens_scored,
        "sequences": scores.sequences,
        "layers": len(scores.token),
        "data_digest": scores.data_digest,
    }
    if general:
        from expertlib.esft.diagnostics import diagnose_scores, format_specialisation

        diag = diagnose_scores(base, scores, general)
        summary["specialisation"] = diag["specialisation"].model_dump()
        summary["retention_risk"] = {k: r.summary() for k, r in diag["risk"].items()}
        if not as_json:
            click.echo(format_specialisation(diag["specialisation"]))
            for name, risk in diag["risk"].items():
                click.echo(f"{name}: {risk.message()}")
    emit(
        as_json,
        summary,
        lambda d: print_table(
            f"scores of {data}", ["field", "value"], [(k, v) for k, v in d.items() if not isinstance(v, dict)]
        ),
    )


@click.command("select")
@click.argument("scores_file", type=click.Path(exists=True))
@field_options(SelectionConfig, "score", "top_p", "max_per_layer")
@_stack(*ablation_options)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="expert_cfg.json to write.")
@field_options(SelectionConfig, "weighting")
@click.option(
    "--top-k", type=int, default=None, help="Reference logs only: the model's top-k (DeepSeek-V2-Lite: 6)."
)
@json_option
@click.pass_context
def select_cmd(
    ctx,
    scores_file,
    score,
    top_p,
    max_per_layer,
    train_shared_experts,
    train_non_expert_modules,
    out,
    weighting,
    top_k,
    as_json,
) -> None:
    """Select the experts to train with the ESFT top-p rule, per layer.

    SCORES_FILE is a file written by `expertlib score`, or a folder of the reference code's
    routing logs (expert_weights_<L>.txt, as deepseek-ai/ESFT writes them; needs --top-k).
    With reference weighting the running sum is compared without slack, as the reference does.
    A scores file keeps the weighting it was scored with; --weighting given with one only checks it.

    Example: expertlib select math.scores.json --score token --top-p 0.2 --out experts.json
    """
    from click.core import ParameterSource

    from expertlib.errors import SelectionError
    from expertlib.esft.reference_logs import is_reference_log_dir, score_reference_logs
    from expertlib.esft.scoring import ExpertScores
    from expertlib.esft.selection import select_experts, top_p_rule

    if is_reference_log_dir(scores_file):
        if top_k is None:
            raise SelectionError(
                "reading reference routing logs needs the model's top-k",
                hint="pass --top-k (DeepSeek-V2-Lite: 6)",
            )
        source = score_reference_logs(scores_file, top_k=top_k, weighting=weighting)
    else:
        source = ExpertScores.load(scores_file)
        given = ctx.get_parameter_source("weighting") == ParameterSource.COMMANDLINE
        if given and weighting != source.weighting:
            raise SelectionError(
                f"{scores_file} was scored with {source.weighting} weighting",
                hint=f"rescore with `expertlib score --weighting {weighting}`",
            )
    scores = source.of(score)
    p, eps = top_p_rule(score, top_p, source.weighting)
    cfg = select_experts(
        scores,
        p,
        max_per_layer=max_per_layer,
        shared_experts=train_shared_experts,
        non_expert_modules=train_non_expert_modules,
        eps=eps,
    )
    cfg.save(out)
    rows = [
        {"layer": layer, "experts": ids, "score_sum": round(sum(scores[layer][e] for e in ids), 4)}
        for layer, ids in cfg.experts.items()
    ]

    def render(rs):
        print_table(
            f"{score} top-p {p}: {cfg.num_experts} experts",
            ["layer", "experts", "score sum"],
            [(r["layer"], " ".join(map(str, r["experts"])), r["score_sum"]) for r in rs],
        )

    emit(as_json, rows, render)


@click.command("train")
@click.argument("base", required=False)
@click.argument("data", required=False, type=click.Path(dir_okay=False))
@click.option("--task", help="Task name recorded in the patch.  [required, except with --from]")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Patch to write [TASK.safetensors].")
@click.option(
    "--from",
    "from_set",
    metavar="SET",
    help="Train again the expert set SET (a .safetensors file, or a name in $EXPERTLIB_REGISTRY) with the "
    "settings recorded in it: the options given here replace those; BASE, DATA and --task default to its own.",
)
@field_options(SelectionConfig, "score", "top_p", "max_per_layer")
@field_option(SelectionConfig, "experts", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@budget_option
@tokens_option
@field_options(SelectionConfig, "keep", "keep_mode", "keep_share")
@field_options(SelectionConfig, "weighting")
@_stack(*ablation_options)
@field_options(
    TrainConfig,
    *["lr", "steps", "batch_size", "grad_accum", "warmup_steps", "schedule", "weight_decay", "dtype"],
    *["master_dtype", "gradient_checkpointing", "seed"],
)
@field_options(RuntimeConfig, "device", "device_map")
@field_options(DataConfig, "max_length", "too_long", "pack", "holdout", "keep_mix")
@field_options(TrainConfig, "mix_share", "mix_weight", "keep_guard", "guard_every", "guard_patience")
@field_option(DataConfig, "eval_data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@field_options(TrainConfig, "eval_every", "early_stop")
@field_option(RuntimeConfig, "checkpoint_dir", type=click.Path(file_okay=False, path_type=Path))
@field_options(TrainConfig, "checkpoint_every")
@field_options(RuntimeConfig, "resume", "fit_check")
@general_option
@json_option
@click.pass_context
def train_cmd(ctx, base, data, task, out, from_set, general, as_json, **kw):
    """Train only the task's experts of BASE on DATA (jsonl) and write an expert-set patch.

    Scores and selects the experts unless --experts gives a selection. The defaults are one recipe
    (the demo's): answer-only scores, ESFT-Token top-p 0.2, and retention-aware selection: experts
    rank by their share of the task's routing minus that of the kept data, and a layer trains them
    only while they carry at most --keep-share of the kept routing, up to the paper's top-p count of
    experts per layer, every token scored (--keep-mode capped-wide; capped stops at the ranking's
    own count, contrast ranks without the bound, budget bounds the paper's selection) (--keep auto:
    the demo's general tasks on the demo base; on any other base prompts and answers sampled from the base itself,
    once, cached). The keep guard stops training, and keeps the last experts within it, when the
    kept data's answers fall more than --keep-guard below the base's. --keep-mix DATA also trains on the
    skills the set must keep doing (e.g. its domain's pretrained tasks). With --general, reports
    (before training) how much of the general data's routing the selected experts carry. After
    training, says whether the set answers the data (teacher-forced, on held-out data when some
    is held out) and, when it falls short, why.

    Picking the learning rate: without --lr it is picked from the model's size (3e-3 for the
    1.9M-parameter demo base down to the paper's 1e-5 at 16B; recorded in the patch's provenance). The
    paper's 1e-5 is for a 16B model trained 500 steps of 32 x 4096 tokens. Smaller models and shorter runs need more: try 1e-5..1e-4 for billion-parameter
    bases and 1e-3..1e-2 for toy ones (the demo uses 3e-3), hold data out (--holdout or
    --eval-data with --eval-every) and lower it when the held-out loss rises while the train
    loss falls; --early-stop stops there and keeps the best experts.

    Example: expertlib train ./base math.jsonl --task math --score gate --top-p 0.1 --steps 200

    Again, 500 steps: expertlib train --from math.safetensors --steps 500 --out math2.safetensors
    """
    from expertlib.esft.pipeline import train_esft

    if from_set is not None:
        base, data, task = _recorded_settings(ctx, from_set, base, data, task, out, kw)
    if base is None or data is None or task is None:
        raise click.UsageError("train needs BASE, DATA and --task (or --from SET)")

    risk = {}
    on_selection = None
    kept_nothing = kw["experts"] is not None or "none" in kw["keep"]  # the selection ignores kept data
    if general:
        from expertlib.esft.diagnostics import check_retention

        def on_selection(model, selection, _samples) -> dict:
            from expertlib.esft.data import load_tokenizer

            risk["r"] = check_retention(model, load_tokenizer(base), selection, general, base=base)
            click.echo(risk["r"].message(), err=True)
            if risk["r"].at_risk and kept_nothing:
                cmd = rerun_command(ctx, drop=("keep", "experts"), add=("--keep", general))
                click.echo(f"to leave the experts of {general} alone, train with:\n  {cmd}", err=True)
            return {"retention_risk": risk["r"].summary()}  # kept in the manifest (show, the web view)

    selection = SelectionConfig(**take(SelectionConfig, kw))
    config = TrainConfig(**take(TrainConfig, kw))
    data_config = DataConfig(**take(DataConfig, kw))
    runtime = RuntimeConfig(**take(RuntimeConfig, kw))
    assert not kw, f"options without a config group: {sorted(kw)}"
    es = train_esft(
        base,
        data,
        task=task,
        out=out or f"{task}.safetensors",
        selection=selection,
        config=config,
        data_config=data_config,
        runtime=runtime,
        on_selection=on_selection,
        on_plan=_print_plan,
    )
    from expertlib.esft.distributed import context

    if not context().is_main:
        return  # under torchrun / accelerate launch, rank 0 reports
    m, p = es.manifest, es.manifest.provenance
    _report_keep_and_fit(ctx, p)
    data_out = {
        "out": str(es.path),
        "task": m.task,
        "method": p.method,
        "experts": m.num_experts,
        "layers": len(m.experts),
        "trainable_params": p.trainable_params,
        "steps": p.steps,
        "final_train_loss": p.final_train_loss,
        "final_eval_loss": p.final_eval_loss,
        "wall_time_s": p.wall_time_s,
        "bytes": es.nbytes,
    }
    if risk:
        data_out["retention_risk"] = risk["r"].summary()
    for key in ("keep", "fit"):
        if p.extra.get(key):
            data_out[key] = p.extra[key]
    emit(as_json, data_out, lambda d: print_table(f"trained {task}", ["field", "value"], list(d.items())))


def _recorded_settings(ctx, from_set: str, base, data, task, out, kw: dict):
    """`--from SET`: fill `kw` with the settings groups recorded in SET, except the options given on the
    command line (the set's selection, data and training settings; where it runs is this run's own); returns (base, data, task), each the given one or SET's own."""
    from click.core import ParameterSource

    from expertlib.esft.pipeline import settings_of
    from expertlib.patch import ExpertSet

    if from_set.endswith(".safetensors"):
        es = ExpertSet.open(from_set)
    else:
        from expertlib.registry import Registry

        es = Registry().open(from_set)
    task = task or es.manifest.task
    if Path(out or f"{task}.safetensors").resolve() == Path(es.path).resolve():
        raise click.UsageError(f"training again would overwrite {es.path}: give --out")
    for group in settings_of(es):
        for name, value in group:  # fields without an option too (betas, max_grad_norm, ...)
            if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
                kw[name] = value
    return base or es.manifest.base.name, data or es.manifest.provenance.extra.get("data_path"), task


def rerun_command(ctx: click.Context, *, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """The `expertlib train` command line the user gave (options they set, in order), without the
    options named in `drop`, with `add` appended: what to run instead."""
    import shlex

    from click.core import ParameterSource

    parts = ["expertlib", ctx.info_name or "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            parts.append(shlex.quote(str(value)))
            continue
        if param.name in drop or ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        if param.is_flag:
            opts = param.opts if value else param.secondary_opts
            if opts:
                parts.append(opts[0])
            continue
        for v in value if param.multiple else (value,):
            parts += [param.opts[0], shlex.quote(str(v))]
    return " ".join(parts + [shlex.quote(a) for a in add])


def _report_keep_and_fit(ctx: click.Context, p) -> None:
    """On stderr, after training: what the keep constraint did and the fit verdict (`FitReport`)."""
    from expertlib.esft.keep import FitReport

    keep = p.extra.get("keep")
    if keep:
        for i, src in enumerate(keep["sources"]):
            now = max(v[i] for v in keep["kept_share"].values())
            paper = max(v[i] for v in keep["paper_kept_share"].values())
            click.echo(
                f"kept {src['name']} ({src['kind']}, {src['samples']} samples): the trained experts carry at most "
                f"{now:.2f} of its routing per layer (the paper's selection: {paper:.2f})",
                err=True,
            )
            if now > keep["share"] and keep["mode"] == "contrast":  # contrast ranks, it does not bound
                cmd = rerun_command(ctx, drop=("keep_mode",), add=("--keep-mode", "capped-wide"))
                click.echo(
                    f"  more than --keep-share {keep['share']}: the kept skills are at risk (contrast mode ranks "
                    f"experts by task against kept routing, it does not bound it); to bound it: `{cmd}`",
                    err=True,
                )
        if keep["dropped"]:
            click.echo(
                "  not trained, to keep it: "
                + "; ".join(
                    f"layer {layer}: experts {', '.join(map(str, ids))} ({keep['dropped_task_share'][layer]:.2f} of "
                    "the task's routing)"
                    for layer, ids in keep["dropped"].items()
                ),
                err=True,
            )
        if keep.get("fallback"):
            click.echo(
                "  no expert the task uses stays under --keep-share: trained the paper's selection anyway, and "
                "the kept skills are at risk. The trade-off: --keep-share 0.3 keeps some experts frozen, "
                "--keep-mix DATA rehearses the kept skills, --keep none accepts the loss",
                err=True,
            )
    guard = p.extra.get("keep_guard")
    if guard and "stopped_step" in guard:
        cmd = rerun_command(ctx, drop=("keep_guard",), add=("--keep-guard", "1"))
        click.echo(
            f"keep guard: at step {guard['stopped_step']} the kept data's {guard.get('measure', 'exact match')} "
            "(teacher-forced) fell to "
            f"{guard['stopped_exact']:.2f} from the base's {guard['base_exact']:.2f} (more than --keep-guard "
            f"{guard['guard']}): training stopped and kept the experts of step {guard['kept_step']} "
            f"({guard['kept_exact']:.2f}). The task's experts are the kept skills' here; the trade-off: "
            f"`{cmd}` trains every step at the cost of the kept skills, --keep-mix DATA rehearses them while "
            "training",
            err=True,
        )
    if p.extra.get("fit"):
        hint = f"`{rerun_command(ctx, drop=('keep',), add=('--keep', 'none'))}`" if keep else None
        budget = (
            f"`{rerun_command(ctx, drop=('keep_mode',), add=('--keep-mode', 'budget'))}`"
            if keep and keep["mode"] != "budget"
            else None
        )
        click.echo(FitReport(**p.extra["fit"]).message(keep_hint=hint, budget_hint=budget), err=True)


COMMANDS = [score_cmd, select_cmd, train_cmd]
