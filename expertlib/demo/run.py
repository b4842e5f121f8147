"""`expertlib demo` as a library function: from nothing to a served multi-task expert library.

    report = run_demo(DemoSettings(quick=True))

Steps, each printed as it happens:
1. install the shipped demo base (digest-checked; pretrained on the general tasks of three
   domains) and measure how its experts specialise (`expertlib.esft.diagnostics`); start
   `expertlib serve` on it (eager, empty slots: it gets ready while the sets train, and loads each
   set from the registry on its first request);
2. for each specialised task, write its training data (jsonl) and train an ESFT expert set
   (`expertlib.esft.pipeline.train_esft` with `expertlib train`'s defaults: answer-only scores,
   top-p, retention-aware selection keeping the built-in general set, the size-based learning
   rate), printing what the selection kept and its retention risk against the general set;
3. publish the sets to the registry (default: `$EXPERTLIB_REGISTRY`) and draw the expert-overlap
   heatmap (`registry diff --plot`);
4. measure exact-match accuracy of the base and of every set on every task, in process
   (`expertlib.demo.evaluate`): the specialised tasks and general-ability retention, and keep the
   scores with each set's version;
5. ask each task's questions through the official `openai` client: naming the task's expert set,
   with `model="auto"` (the server picks the set from the prompt's routing), and naming the base
   for contrast; the first two tasks' questions also of their composition `a+b`;
6. leave the server running for the web view (`keep_serving`, the default: recorded for
   `expertlib.demo.serving.stop_kept`, which the next demo run calls first) or stop it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertlib.demo.base import build_demo_base, cache_dir, demo_base_info, pick_threads
from expertlib.demo.serving import (  # noqa: F401 - BASE_NAME, stop_server: bench/auto_route.py imports them here
    BASE_NAME,
    keep_serving,
    start_server,
    stop_kept,
    stop_server,
    ui_links,
)
from expertlib.demo.tasks import (
    DEMO_TASKS,
    DOMAIN_TASKS,
    GENERAL_TASKS,
    SPECIALISED_TASKS,
    get_task,
    write_jsonl,
)
from expertlib.server import free_port as _free_port
from expertlib.server import wait_ready

#: ESFT training of the demo sets is `expertlib train`'s defaults (steps, batch, warm-up; the learning
#: rate from the base's size); `quick` (what CI runs) trains 100 steps of batch 32 with 10 warm-up steps.
QUICK_STEPS, QUICK_BATCH, QUICK_WARMUP = 100, 32, 10


@dataclass
class DemoSettings:
    """Settings of one demo run (`quick` shrinks the base, the training and the evaluation)."""

    quick: bool = False
    tasks: tuple[str, ...] = DEMO_TASKS
    score: str = "token"
    #: score experts on answer tokens only: the toy chat template is half of every sample, and its
    #: tokens route alike for every task (what a real corpus's content would dominate)
    answer_only: bool = True
    top_p: float | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    warmup_steps: int | None = None
    n_train: int = 2000
    n_eval: int | None = None
    registry: str | None = None
    workdir: str | None = None
    server: bool = True
    #: leave the server running after the demo returns (for the web view); `stop_kept` stops it
    keep_serving: bool = True
    port: int = 0
    ask: int | None = None
    server_timeout_s: float = 600.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        from expertlib.esft.training import TrainConfig

        train = TrainConfig()
        if self.steps is None:
            self.steps = QUICK_STEPS if self.quick else train.steps
        if self.batch_size is None:
            self.batch_size = QUICK_BATCH if self.quick else train.batch_size
        if self.warmup_steps is None:
            self.warmup_steps = QUICK_WARMUP if self.quick else train.warmup_steps
        if self.n_eval is None:
            self.n_eval = 20 if self.quick else 50
        if self.ask is None:
            self.ask = 3 if self.quick else 5
        for t in self.tasks:
            if get_task(t).kind != "specialised":
                raise ValueError(f"{t!r} is a general task; demo tasks: {', '.join(SPECIALISED_TASKS)}")


@dataclass
class DemoReport:
    base: str
    base_info: dict[str, Any]
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> path, ref, experts, time
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> task -> acc
    served: list[dict[str, Any]] = field(default_factory=list)  # one row per question asked
    served_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {set, base}
    heatmap: str | None = None
    specialisation: dict[str, Any] | None = None  # expertlib.esft.diagnostics.Specialisation
    port: int | None = None
    url: str | None = None
    ui: dict[str, str] = field(default_factory=dict)  # the web view's pages (while the server runs)
    kept: bool = False  # the server was left running
    server_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_task_set(
    base: str | Path, task: str, workdir: Path, s: DemoSettings, *, log: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]]:
    """Write `task`'s training data and train its ESFT expert set; returns (patch path, summary)."""
    from expertlib.esft.pipeline import RuntimeConfig, SelectionConfig, train_esft
    from expertlib.esft.training import TrainConfig

    split = get_task(task).split(n_train=s.n_train, n_eval=s.n_eval, seed=s.seed)
    data = write_jsonl(split.train, workdir / "data" / f"{task}.jsonl")
    out = workdir / "sets" / f"{task}.safetensors"
    t0 = time.perf_counter()
    risk: dict[str, Any] = {}

    def check_risk(model, selection, _samples) -> dict:
        from expertlib.demo.tokenizer import make_tokenizer
        from expertlib.esft.diagnostics import BUILTIN_GENERAL, check_retention

        risk["r"] = check_retention(model, make_tokenizer(), selection, BUILTIN_GENERAL, base=base)
        return {"retention_risk": risk["r"].summary()}  # kept in the manifest (show, the web view)

    es = train_esft(
        base,
        data,
        task=task,
        out=out,
        description=f"demo: {get_task(task).description}",
        selection=SelectionConfig(  # train's defaults, but for the scoring budget (a toy's data is small)
            score=s.score, top_p=s.top_p, token_budget=20_000, count_prompt_tokens=not s.answer_only
        ),
        config=TrainConfig(
            lr=s.lr, steps=s.steps, batch_size=s.batch_size, warmup_steps=s.warmup_steps, seed=s.seed
        ),
        runtime=RuntimeConfig(progress=s.progress),
        on_selection=check_risk,
    )
    m = es.manifest
    summary = {
        "path": str(out),
        "experts_per_layer": {str(k): len(v) for k, v in m.experts.items()},
        "num_experts": m.num_experts,
        "size_bytes": out.stat().st_size,
        "train_time_s": round(time.perf_counter() - t0, 1),
        "final_train_loss": m.provenance.final_train_loss,
        "retention_risk": risk["r"].summary(),
        "keep": m.provenance.extra.get("keep"),
        "fit": m.provenance.extra.get("fit"),
    }
    kept = summary["keep"] or {}
    dropped = "; ".join(
        f"layer {k}: {', '.join(map(str, v))}" for k, v in (kept.get("dropped") or {}).items()
    )
    log(
        f"  {task}: {m.num_experts} experts over {len(m.experts)} layers "
        f"({', '.join(f'{len(v)}' for v in m.experts.values())} per layer), "
        f"loss {summary['final_train_loss']:.3f}, {summary['train_time_s']:.0f} s\n    {risk['r'].message()}"
        + (f"\n    kept the general tasks' experts untrained ({dropped})" if dropped else "")
    )
    return out, summary


def run_demo(s: DemoSettings | None = None, *, log: Callable[[str], None] = print) -> DemoReport:
    """Run the whole demo (see the module docstring); returns what it measured. A demo server left
    running by an earlier run is stopped first; with `keep_serving` this run's server is left
    running when this returns (`report.url`, `report.ui`)."""
    from expertlib.registry import Registry

    s = s or DemoSettings()
    t_start = time.perf_counter()
    workdir = Path(s.workdir) if s.workdir else cache_dir() / "demo" / ("quick" if s.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    old = stop_kept()
    if old is not None:
        log(f"stopped the demo server an earlier run left at {old['url']}")
    import torch

    torch.set_num_threads(pick_threads())

    log("[1/5] demo base (shipped with expertlib, digest-checked)")
    t0 = time.perf_counter()
    base = build_demo_base(progress=s.progress)
    info = demo_base_info(base)
    report = DemoReport(base=str(base), base_info=info)
    acc = ", ".join(f"{k} {v:.2f}" for k, v in info["accuracy"].items())
    c = info["config"]
    log(
        f"  {base}\n  {c['num_layers']} MoE layers x {c['num_experts']} routed experts (top-{c['top_k']}) + 1 shared; "
        f"pretrained {info['steps']} steps on {len(c['tasks'])} tasks (general and domain); accuracy: {acc}"
    )
    from expertlib.demo.evaluate import task_specialisation
    from expertlib.esft.diagnostics import format_specialisation

    spec = task_specialisation(base, [*GENERAL_TASKS, *DOMAIN_TASKS, *s.tasks])
    report.specialisation = spec.model_dump()
    log("  " + format_specialisation(spec).replace("\n", "\n  "))
    report.timings["base_s"] = round(time.perf_counter() - t0, 1)
    reg = Registry(s.registry)
    proc = log_path = None
    t_server = time.perf_counter()
    if s.server:  # the engine starts while the sets train; each set loads on its first request
        report.port = s.port or _free_port()
        log_path = workdir / "server.log"
        proc, report.url = start_server(
            base, str(reg.root), [], report.port, log_path, slots=c["num_experts"]
        )
        log(f"  `expertlib serve` starting at {report.url} while the sets train (log: {log_path})")
    try:
        _train_to_serve(s, base, info, report, reg, workdir, proc, log_path, t_server, log)
    finally:
        if proc is not None and not report.kept:
            stop_server(proc)
    report.timings["total_s"] = round(time.perf_counter() - t_start, 1)
    (workdir / "demo_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report


def _train_to_serve(s, base, info, report, reg, workdir, proc, log_path, t_server, log) -> None:
    """Steps 2 to 5 (see the module docstring); `proc`: the server started after step 1, or None."""
    from expertlib.demo.evaluate import evaluate
    from expertlib.registry.diff import plot_diff

    log(f"[2/5] training ESFT-{s.score} expert sets: {', '.join(s.tasks)}")
    t0 = time.perf_counter()
    paths = {}
    for task in s.tasks:
        paths[task], report.sets[task] = train_task_set(base, task, workdir, s, log=log)
    report.timings["train_s"] = round(time.perf_counter() - t0, 1)

    log("[3/5] publishing to the registry")
    for task, p in paths.items():
        entry = reg.publish(p, tags=["demo"], base=base)
        report.sets[task]["ref"] = str(entry.ref)
        log(f"  {entry.ref}  ({report.sets[task]['size_bytes'] / 1024:.0f} KiB) in {reg.root}")
    refs = [report.sets[t]["ref"] for t in s.tasks]
    if len(s.tasks) >= 2:  # a diff needs two sets
        diff = reg.diff(refs, base=base, base_dir=base)
        heatmap = plot_diff(diff, workdir / "expert_overlap.png", num_experts=info["config"]["num_experts"])
        report.heatmap = str(heatmap)
        log(f"  expert-overlap heatmap: {report.heatmap}")
    log("[4/5] exact-match accuracy, in process (base vs each set; specialised, general and domain tasks)")
    t0 = time.perf_counter()
    res = evaluate(
        base,
        [str(paths[t]) for t in s.tasks],
        tasks=[*s.tasks, *GENERAL_TASKS, *DOMAIN_TASKS],
        n_eval=s.n_eval,
        seed=s.seed,
        progress=s.progress,
        keep_samples=True,
    )
    report.accuracy = {("base" if c == "base" else Path(c).stem): v for c, v in res.accuracy.items()}
    report.timings["eval_s"] = round(time.perf_counter() - t0, 1)
    from expertlib.registry.evals import accuracy_records, retention_records

    for t in s.tasks:  # scores and retention risk, kept with each set's version (list, show, /ui)
        column = str(paths[t])
        records = accuracy_records(res.accuracy[column], res.samples[column], source="expertlib demo")
        records += retention_records(report.sets[t]["retention_risk"], source="expertlib demo")
        reg.record_evals(report.sets[t]["ref"], records, base=base)
    if proc is not None:
        _serve_step(proc, log_path, report, res, paths, s, t_server, log)


def _serve_step(
    proc, log_path: Path, report: DemoReport, res, paths: dict, s: DemoSettings, t_server: float, log
) -> None:
    """Step 5: wait for the server, ask it, then leave it running (keep_serving) or let it be stopped.
    A failure is reported, not raised: the in-process numbers above still stand."""
    from expertlib.demo.serving import ask_server

    url = report.url
    assert url is not None
    log("[5/5] serving: asked through the openai client, naming each set, with model=auto, and the base")
    t0 = time.perf_counter()
    try:
        wait_ready(url, timeout_s=s.server_timeout_s, proc=proc, log_path=log_path)
        report.timings["server_ready_s"] = round(time.perf_counter() - t_server, 1)
        log(f"  ready at {url} ({report.timings['server_ready_s']:.0f} s after it was started)")
        report.served, report.served_accuracy = ask_server(
            url, s.tasks, s.ask, s.n_eval, s.seed, compose=s.tasks[:2]
        )
        for row in report.served:  # the same question answered in process (transformers)
            task = row["served_by"].split("@", 1)[0]
            column = "base" if task not in paths else str(paths[task])
            if row["served_by"] and "+" not in row["served_by"]:  # not a composition (or its refusal)
                local = {d["prompt"]: d["prediction"] for d in res.samples[column][row["task"]]}
                row["in_process"] = local.get(row["prompt"], "").strip()
    except Exception as exc:
        report.server_error = f"{type(exc).__name__}: {exc}"
        log(f"  server step failed: {report.server_error}")
        return
    finally:
        report.timings["serve_s"] = round(time.perf_counter() - t0, 1)
    if s.keep_serving:
        report.ui = ui_links(url, [report.sets[t]["ref"] for t in s.tasks])
        keep_serving(proc, url, log_path, port=report.port)
        report.kept = True
