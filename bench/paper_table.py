"""The ESFT paper's comparison (Tables 1-2, Figures 2-3) at toy scale, on the shipped demo base.

For each demo task (`expertlib.demo.tasks.DEMO_TASKS`): full fine-tuning (FFT), LoRA (PEFT,
rank 8, attention, shared expert and routed experts), ESFT-Token (p=0.2) and ESFT-Gate (p=0.1),
with the same data, the same number of steps, the same batches (expertlib.esft.training's sampler and
loss), AdamW and cosine schedule. Reports per task and method: task accuracy, general-task
accuracy with the result applied (ability retention), train time, output size, and for ESFT the
experts each layer selected and the share of the general data's routing they carry
(`expertlib.esft.diagnostics.retention_risk`). Also the specialisation figures of the base: each
task's top-k routing share and the overlap of top-k experts between tasks. Learning curves (task
and general accuracy every `--curve-every` steps) go to bench/curves_<task>.png, and the rows to
bench/paper_table.json.

    python bench/paper_table.py                                  # the table in bench/RESULTS.md
    python bench/paper_table.py --sweep --no-write               # LR x method sweep (see --help)
    python bench/paper_table.py --tasks sum --methods esft-token --steps 40 --no-write   # smoke run

Learning rates are toy-scale choices from the sweep (the paper's 1e-5 / 3e-5 / 1e-4 are for a
16B model; a 2M-parameter model trained for a few hundred steps needs ~100x more). Each method
gets its own LR, as in the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ("full", "lora", "esft-token", "esft-gate")
LABEL = {"full": "FFT", "lora": "LoRA (r=8)", "esft-token": "ESFT-Token", "esft-gate": "ESFT-Gate"}
#: Per-method learning rates (from the sweep in bench/RESULTS.md, "ESFT sweep (toy scale)").
LR = {"full": 1e-3, "lora": 5e-3, "esft-token": 3e-3, "esft-gate": 3e-3}
TOP_P = {"esft-token": 0.2, "esft-gate": 0.1}
SWEEP_LR = {"full": (3e-4, 1e-3, 3e-3), "lora": (2e-3, 5e-3, 1e-2), "esft-token": (2e-3, 5e-3, 1e-2, 2e-2)}
SECTION = "## Paper table (toy scale)"
SWEEP_SECTION = "## ESFT sweep (toy scale)"


def _accuracy(model, tok, task: str, args, *, forced: bool = False) -> tuple[float, float, dict]:
    """(task accuracy, mean general accuracy, per general task): greedy generation, or teacher-forced."""
    from expertlib.demo.evaluate import eval_examples, evaluate_model, forced_accuracy
    from expertlib.demo.tasks import GENERAL_TASKS

    if forced:
        acc = forced_accuracy(model, tok, eval_examples(task, args.n_eval))
        gen = {t: forced_accuracy(model, tok, eval_examples(t, args.n_general)) for t in GENERAL_TASKS}
    else:
        acc = evaluate_model(model, tok, [task], n_eval=args.n_eval, progress=False)[task]
        gen = evaluate_model(model, tok, GENERAL_TASKS, n_eval=args.n_general, progress=False)
    return acc, sum(gen.values()) / len(gen), gen


def run_method(
    base: Path, task: str, method: str, samples, args, *, lr: float, top_p: float | None, general_shares
) -> dict:
    """Train one method on one task; returns its row (accuracies, curve, time, size, selection)."""
    import torch
    from baselines import trainable_baseline

    from expertlib.demo.evaluate import evaluate_model
    from expertlib.demo.tasks import DOMAIN_TASKS
    from expertlib.esft.data import collate
    from expertlib.esft.diagnostics import retention_risk
    from expertlib.esft.scoring import score_experts
    from expertlib.esft.selection import select_experts
    from expertlib.esft.training import TrainConfig, batch_indices, loss_sum, train_experts
    from expertlib.moe import load_model
    from expertlib.testing import make_tokenizer

    tok = make_tokenizer()
    cfg = TrainConfig(
        lr=lr, steps=args.steps, batch_size=args.batch_size, warmup_steps=min(20, args.steps // 10), seed=0
    )
    row: dict = {"task": task, "method": method, "lr": lr, "steps": args.steps, "curve": []}
    model = load_model(base, dtype=torch.float32)
    eval_time = 0.0
    trained = model

    def checkpoint(step: int) -> None:
        nonlocal eval_time
        if step == args.steps or (args.curve_every and step % args.curve_every == 0):
            t = time.perf_counter()
            acc, gen, _ = _accuracy(trained, tok, task, args, forced=True)
            row["curve"].append([step, round(acc, 4), round(gen, 4)])
            if step == args.steps:
                row["task_acc"], row["general_acc"], row["general"] = _accuracy(trained, tok, task, args)
                row["domain"] = evaluate_model(
                    trained, tok, DOMAIN_TASKS, n_eval=args.n_general, progress=False
                )
                row["domain_acc"] = sum(row["domain"].values()) / len(row["domain"])
            eval_time += time.perf_counter() - t

    t0 = time.perf_counter()
    if method.startswith("esft"):
        score = method.split("-")[1]
        row["top_p"] = top_p
        scores = score_experts(
            model,
            samples,
            pad_id=0,
            token_budget=20_000,
            batch_size=32,
            count_prompt_tokens=not args.answer_only,
            progress=False,
        )
        selection = select_experts(scores.of(score), top_p)
        risk = retention_risk(selection, general_shares, task=scores.token)
        row["experts_per_layer"] = [len(selection.experts[layer]) for layer in sorted(selection.experts)]
        row["general_mass"] = round(risk.mean_general_mass, 4)
        row["general_mass_max"] = round(risk.max_general_mass, 4)
        row["task_mass"] = round(
            sum(r.task_mass for r in risk.layers) / len(risk.layers), 4
        )  # share of the task's own routing
        result = train_experts(
            model, samples, selection, cfg, pad_id=0, progress=False, on_step=lambda s, _: checkpoint(s)
        )
        row["trainable_params"] = result.trainable_params
        row["output_bytes"] = result.trainable_params * 4
        row["final_loss"] = result.train_losses[-1]
    else:
        trained = trainable_baseline(model, method)
        params = [p for p in trained.parameters() if p.requires_grad]
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        trained.train()
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            batch = [samples[i] for i in batch_indices(step, 0, cfg, len(samples))]
            n = max(1, sum(sum(1 for y in s.labels[1:] if y != -100) for s in batch))
            loss = loss_sum(trained, collate(batch, 0), cfg) / n
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            row["final_loss"] = float(loss.detach())
            checkpoint(step + 1)
            trained.train()
        trained.eval()
        row["trainable_params"] = sum(p.numel() for p in params)
        total = sum(p.numel() for p in model.parameters())
        row["output_bytes"] = (total if method == "full" else row["trainable_params"]) * 4
    row["train_time_s"] = time.perf_counter() - t0 - eval_time
    return row


def specialisation_figures(base: Path, tasks, args):
    """(Specialisation over general + given tasks, general routing shares) on the base."""
    import torch

    from expertlib.demo.evaluate import task_routing
    from expertlib.demo.tasks import DEMO_TASKS, PRETRAIN_TASKS
    from expertlib.esft.diagnostics import builtin_general_samples, routing_shares, specialisation
    from expertlib.moe import load_model
    from expertlib.testing import make_tokenizer

    tok = make_tokenizer()
    model = load_model(base, dtype=torch.float32)
    # the answer-producing positions of 100 eval prompts per task, and of the built-in general set
    shares = task_routing(
        model, tok, list(dict.fromkeys([*PRETRAIN_TASKS, *DEMO_TASKS, *tasks])), n=100, seed=1
    )
    general = routing_shares(
        model, builtin_general_samples(base, tok), pad_id=0, token_budget=None, count_prompt_tokens=False
    )
    return specialisation(shares, k=model.config.num_experts_per_tok), general


def spec_text(spec) -> list[str]:
    from expertlib.demo.tasks import TASKS

    names = list(spec.concentration)
    lines = [
        f"Specialisation of the base (ESFT-Token routing shares of 100 eval prompts per task): share of each "
        f"task's routing mass on its top {spec.k} of {spec.num_experts} experts per layer, mean over layers "
        f"(uniform routing: {spec.chance:.2f}); overlap = |top-{spec.k}(A) ∩ top-{spec.k}(B)| / {spec.k}, mean over layers.",
        "",
        "| task | domain | top-k share | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for a in names:
        lines.append(
            f"| {a} | {TASKS[a].domain} | {spec.concentration[a]:.2f} | "
            + " | ".join(f"{spec.overlap[a][b]:.2f}" for b in names)
            + " |"
        )
    return lines


def plot_curves(rows, base_acc, task: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        if r["task"] != task or not r["curve"]:
            continue
        steps = [c[0] for c in r["curve"]]
        label = f"{LABEL[r['method']]} lr {r['lr']:g}"
        axes[0].plot(steps, [c[1] for c in r["curve"]], marker="o", label=label)
        axes[1].plot(steps, [c[2] for c in r["curve"]], marker="o", label=label)
    axes[0].axhline(base_acc["task_acc"][task], color="grey", ls=":", label="base")
    axes[1].axhline(base_acc["general_acc"], color="grey", ls=":", label="base")
    axes[1].axhline(base_acc["general_acc"] - 0.05, color="grey", ls="--", lw=0.8, label="base - 0.05")
    axes[0].set_title(f"{task}: task accuracy")
    axes[1].set_title(f"{task}: general accuracy (set applied)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def base_row(base: Path, tasks, args) -> dict:
    import torch

    from expertlib.moe import load_model
    from expertlib.testing import make_tokenizer

    model = load_model(base, dtype=torch.float32)
    tok = make_tokenizer()
    out = {"task_acc": {}, "general_acc": None}
    for t in tasks:
        out["task_acc"][t], out["general_acc"], out["general"] = _accuracy(model, tok, t, args)
    from expertlib.demo.evaluate import evaluate_model
    from expertlib.demo.tasks import DOMAIN_TASKS

    out["domain"] = evaluate_model(model, tok, DOMAIN_TASKS, n_eval=args.n_general, progress=False)
    out["domain_acc"] = sum(out["domain"].values()) / len(out["domain"])
    return out


def _check(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(rows, base, tasks, args, base_path: Path, info: dict, spec) -> str:
    from expertlib.demo.tasks import DOMAIN_TASKS, GENERAL_TASKS

    c = info["config"]
    lines = [
        SECTION,
        "",
        f"`python bench/paper_table.py --steps {args.steps}` on the shipped demo base ({c['num_layers']} MoE layers, "
        f"{c['num_experts']} routed experts top-{c['top_k']} + 1 shared, {c['hidden_size']} hidden; pretrained on "
        f"{len(GENERAL_TASKS)} general tasks (words: {', '.join(GENERAL_TASKS)}) and {len(DOMAIN_TASKS)} domain tasks "
        f"({', '.join(DOMAIN_TASKS)}); `{base_path.name}`). Same data ({args.n_train} samples per task), "
        f"{args.steps} steps of batch {args.batch_size}, AdamW, cosine schedule, float32, one CPU thread. "
        f"Task accuracy: exact match on {args.n_eval} eval prompts; general: mean exact match over the "
        f"{len(GENERAL_TASKS)} general tasks ({args.n_general} each) with the result applied. Learning rates: "
        + ", ".join(f"{LABEL[m]} {LR[m]:g}" for m in METHODS)
        + f"; ESFT-Token p={TOP_P['esft-token']}, ESFT-Gate p={TOP_P['esft-gate']}. 'general mass' = share of the "
        "general data's routing on the selected experts (mean over layers; `expertlib.esft.diagnostics`). 'domain acc' "
        "= mean exact match over the pretraining-only domain tasks (add, sub, flip, close; the fine-tuned task's "
        "own domain among them). Train time "
        "excludes evaluation and includes ESFT's scoring pass; the machine was shared, so times are noisy. "
        "Output size: the float32 tensors a method ships (FFT: the whole model).",
        "",
        "| task | method | task acc | x FFT | general acc | - base | domain acc | train time (s) | output | trainable params | experts/layer | general mass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        fft = next((r for r in rows if r["task"] == t and r["method"] == "full"), None)
        lines.append(
            f"| {t} | untuned base | {base['task_acc'][t]:.2f} | - | {base['general_acc']:.2f} | - | "
            f"{base.get('domain_acc', 0):.2f} | - | - | - | - | - |"
        )
        for r in (r for r in rows if r["task"] == t):
            epl = ",".join(str(x) for x in r.get("experts_per_layer", [])) or "-"
            xf = f"{r['task_acc'] / fft['task_acc']:.2f}" if fft and fft["task_acc"] else "-"
            lines.append(
                f"| {t} | {LABEL[r['method']]} | {r['task_acc']:.2f} | {xf} | {r['general_acc']:.2f} | "
                f"{r['general_acc'] - base['general_acc']:+.2f} | {r.get('domain_acc', 0):.2f} | {r['train_time_s']:.0f} | "
                f"{r['output_bytes'] / 1024:.0f} KiB | {r['trainable_params']:,} | {epl} | "
                f"{r.get('general_mass', '-')} |"
            )
    lines += [
        "",
        "Mean over tasks:",
        "",
        "| method | task acc | general acc | train time (s) | output |",
        "|---|---|---|---|---|",
        f"| untuned base | {sum(base['task_acc'][t] for t in tasks) / len(tasks):.2f} | {base['general_acc']:.2f} | - | - |",
    ]
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            k = len(rs)
            lines.append(
                f"| {LABEL[m]} | {sum(r['task_acc'] for r in rs) / k:.2f} | {sum(r['general_acc'] for r in rs) / k:.2f} | "
                f"{sum(r['train_time_s'] for r in rs) / k:.0f} | {sum(r['output_bytes'] for r in rs) / k / 1024:.0f} KiB |"
            )
    lines += [
        "",
        "Targets (ESFT-Token): task accuracy >= 0.95x FFT; general accuracy >= base - 0.05 and above FFT's and LoRA's.",
        "",
        "| task | task >= 0.95x FFT | general >= base - 0.05 | general > FFT | general > LoRA |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        by = {r["method"]: r for r in rows if r["task"] == t}
        e = by.get("esft-token")
        if not e:
            continue
        f, lo = by.get("full"), by.get("lora")
        lines.append(
            f"| {t} | {_check(e['task_acc'] >= 0.95 * f['task_acc']) if f else '-'} | "
            f"{_check(e['general_acc'] >= base['general_acc'] - 0.05)} | "
            f"{_check(e['general_acc'] > f['general_acc']) if f else '-'} | "
            f"{_check(e['general_acc'] > lo['general_acc']) if lo else '-'} |"
        )
    lines += ["", *spec_text(spec), ""]
    curves = [f"`bench/curves_{t}.png`" for t in tasks]
    lines.append(
        f"Learning curves (teacher-forced exact match, a lower bound of the greedy one, every {args.curve_every} steps): {', '.join(curves)}."
    )
    return "\n".join(lines) + "\n"


def sweep_text(rows, base, args) -> str:
    lines = [
        SWEEP_SECTION,
        "",
        f"`python bench/paper_table.py --sweep --steps {args.steps}`: every method at several learning rates "
        f"(ESFT-Token also at p in {args.sweep_p}), {args.steps} steps of batch {args.batch_size}; accuracy on the "
        f"eval prompts ({args.n_eval} task, {args.n_general} per general task). Curves: the accuracy at every "
        f"{args.curve_every} steps (task / general).",
        "",
        "| task | method | lr | p | task acc | general acc | experts/layer | general mass | curve (step: task/general) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = " ".join(f"{s}: {a:.2f}/{g:.2f}" for s, a, g in r["curve"])
        epl = ",".join(str(x) for x in r.get("experts_per_layer", [])) or "-"
        lines.append(
            f"| {r['task']} | {LABEL[r['method']]} | {r['lr']:g} | {r.get('top_p', '-')} | {r['task_acc']:.2f} | "
            f"{r['general_acc']:.2f} | {epl} | {r.get('general_mass', '-')} | {curve} |"
        )
    lines.append("")
    lines.append(
        f"Untuned base: general {base['general_acc']:.2f}; "
        + ", ".join(f"{t} {a:.2f}" for t, a in base["task_acc"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


def merge(args) -> None:
    """The table (or sweep section) from the JSON files of runs made with the same settings."""
    from expertlib.demo.base import build_demo_base, demo_base_info
    from expertlib.esft.diagnostics import Specialisation

    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    first = parts[0]
    for key, value in first["args"].items():
        if key not in ("tasks", "json", "merge", "no_write"):
            setattr(args, key, value)
    rows = [r for p in parts for r in p["rows"]]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    base_acc = {
        **first["base"],
        "task_acc": {},
    }
    for p in parts:
        base_acc["task_acc"].update(p["base"]["task_acc"])
    spec = Specialisation(**first["specialisation"])  # every run measures all pretraining and demo tasks
    base = Path(args.base) if args.base else build_demo_base(progress=False)
    # the table: each method at its recipe LR (and p); the sweep section: every row
    recipe = [
        r for r in rows if r["lr"] == LR[r["method"]] and r.get("top_p") in (None, TOP_P.get(r["method"]))
    ]
    text = table(recipe, base_acc, tasks, args, base, demo_base_info(base), spec)
    many = len(recipe) < len(rows)
    sweep = sweep_text(rows, base_acc, args) if many else ""
    print(text + "\n" + sweep)
    if not args.no_write:
        from results import write_section

        (HERE / "paper_table.json").write_text(
            json.dumps({"base": base_acc, "rows": rows, "specialisation": spec.model_dump()}, indent=1) + "\n"
        )
        for t in tasks:
            plot_curves(rows, base_acc, t, HERE / f"curves_{t}.png")
        write_section(SECTION, text)
        if many:
            write_section(SWEEP_SECTION, sweep)


def main() -> None:
    from expertlib.demo.tasks import DEMO_TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--n-general", type=int, default=50)
    ap.add_argument("--curve-every", type=int, default=50)
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's LR")
    ap.add_argument("--sweep", action="store_true", help="sweep LRs (SWEEP_LR) and ESFT-Token's p")
    ap.add_argument("--sweep-p", type=float, nargs="+", default=[0.2])
    ap.add_argument(
        "--sweep-lr",
        action="append",
        default=[],
        metavar="METHOD=LR,LR",
        help="LRs to sweep for a method (others: SWEEP_LR, or LR for methods given here without it)",
    )
    ap.add_argument(
        "--answer-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ESFT scores count answer tokens only (the toy's chat template is half of every sample)",
    )
    ap.add_argument("--base", default=None, help="a base folder instead of the shipped demo base")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/ alone")
    ap.add_argument("--json", default=None, help="rows as JSON here (default bench/paper_table.json)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="write the table from the rows of earlier runs (e.g. one process per task) instead of training",
    )
    args = ap.parse_args()
    for item in args.lr:
        m, v = item.split("=")
        LR[m] = float(v)
    if args.merge:
        return merge(args)

    import tempfile

    import torch

    from expertlib.demo.base import PRETRAIN_THREADS, build_demo_base, demo_base_info
    from expertlib.demo.tasks import get_task, write_jsonl
    from expertlib.esft.data import load_samples
    from expertlib.testing import make_tokenizer

    torch.set_num_threads(PRETRAIN_THREADS)
    base = Path(args.base) if args.base else build_demo_base(progress=False)
    info = demo_base_info(base)
    spec, general = specialisation_figures(base, args.tasks, args)
    base_acc = base_row(base, args.tasks, args)
    print(f"base: general {base_acc['general_acc']:.2f} {base_acc['task_acc']}", file=sys.stderr, flush=True)
    runs = []
    for m in args.methods:
        given = {k: tuple(float(x) for x in v.split(",")) for k, v in (i.split("=") for i in args.sweep_lr)}
        lrs = (given.get(m) or ((LR[m],) if given else SWEEP_LR.get(m, (LR[m],)))) if args.sweep else (LR[m],)
        ps = args.sweep_p if (args.sweep and m == "esft-token") else (TOP_P.get(m),)
        runs += [(m, lr, p) for lr in lrs for p in ps]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for task in args.tasks:
            split = get_task(task).split(n_train=args.n_train, n_eval=args.n_eval)
            samples = load_samples(write_jsonl(split.train, Path(d) / f"{task}.jsonl"), make_tokenizer())
            for m, lr, p in runs:
                row = run_method(base, task, m, samples, args, lr=lr, top_p=p, general_shares=general)
                rows.append(row)
                print(
                    f"{task:8s} {LABEL[m]:12s} lr {lr:g} p {p} task {row['task_acc']:.2f} general "
                    f"{row['general_acc']:.2f} {row['train_time_s']:.0f} s {row.get('experts_per_layer', '')} "
                    f"gm {row.get('general_mass', '-')} curve {row['curve']}",
                    file=sys.stderr,
                    flush=True,
                )
    out_json = Path(args.json) if args.json else HERE / ("sweep.json" if args.sweep else "paper_table.json")
    payload = {"base": base_acc, "rows": rows, "specialisation": spec.model_dump(), "args": vars(args)}
    if args.json or not args.no_write:
        out_json.write_text(json.dumps(payload, indent=1) + "\n")
    text = (
        sweep_text(rows, base_acc, args)
        if args.sweep
        else table(rows, base_acc, args.tasks, args, base, info, spec)
    )
    print(text)
    if not args.no_write:
        from results import RESULTS, write_section

        if not args.sweep:
            for t in args.tasks:
                plot_curves(rows, base_acc, t, HERE / f"curves_{t}.png")
        write_section(SWEEP_SECTION if args.sweep else SECTION, text)
        print(f"wrote {RESULTS} and {out_json}", file=sys.stderr)


if __name__ == "__main__":
    main()
