"""`expertlib demo` as a library function: from nothing to a served multi-task expert library.

    report = run_demo(DemoSettings(quick=True))

Steps, each printed as it happens:
1. install the shipped demo base (digest-checked; pretrained on the general tasks of three
   domains) and measure how its experts specialise (`expertlib.esft.diagnostics`);
2. for each specialised task, write its training data (jsonl) and train an ESFT expert set
   (`expertlib.esft.pipeline.train_esft` with `expertlib train`'s defaults: answer-only scores,
   top-p, retention-aware selection keeping the built-in general set, the size-based learning
   rate), printing what the selection kept and its retention risk against the general set;
3. publish the sets to the registry (default: `$EXPERTLIB_REGISTRY`) and draw the expert-overlap
   heatmap (`registry diff --plot`);
4. measure exact-match accuracy of the base and of every set on every task, in process
   (`expertlib.demo.evaluate`): the specialised tasks and general-ability retention;
5. start `expertlib serve` on the base with the sets and ask each task's questions through the
   official `openai` client, naming the task's expert set, and the base for contrast;
6. stop the server (or keep it running with `serve_forever=True`) and print the total time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertlib.demo.base import build_demo_base, cache_dir, demo_base_info, pick_threads
from expertlib.demo.tasks import (
    DEMO_TASKS,
    DOMAIN_TASKS,
    GENERAL_TASKS,
    SPECIALISED_TASKS,
    get_task,
    write_jsonl,
)

#: The name the demo base is served under.
BASE_NAME = "demo-base"
#: ESFT training of the demo sets: steps and quick steps (toy scale; see bench/RESULTS.md "ESFT sweep").
#: Everything else is `expertlib train`'s defaults (the learning rate: 3e-3 from the base's size).
STEPS, QUICK_STEPS = 300, 100


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
    batch_size: int = 32
    n_train: int = 2000
    n_eval: int | None = None
    registry: str | None = None
    workdir: str | None = None
    server: bool = True
    serve_forever: bool = False
    port: int = 0
    ask: int | None = None
    server_timeout_s: float = 600.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = QUICK_STEPS if self.quick else STEPS
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
    server_error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def check_risk(model, selection, _samples) -> None:
        from expertlib.esft.diagnostics import BUILTIN_GENERAL, check_retention
        from expertlib.testing import make_tokenizer

        risk["r"] = check_retention(model, make_tokenizer(), selection, BUILTIN_GENERAL)

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
            lr=s.lr, steps=s.steps, batch_size=s.batch_size, warmup_steps=min(20, s.steps // 10), seed=s.seed
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


def start_server(base: Path, registry: str | None, sets: Sequence[str], port: int, log_path: Path):
    """`expertlib serve` as a child process (its own process group); returns (process, url)."""
    cmd = [sys.executable, "-m", "expertlib.cli.main", "serve", str(base), "--served-name", BASE_NAME]
    cmd += ["--port", str(port), "--host", "127.0.0.1"]
    # float32 like the in-process evaluation (vLLM's CPU default is bfloat16), so served answers
    # can be compared token for token with in-process ones.
    cmd += ["--engine-arg", "dtype=float32"]
    if registry:
        cmd += ["--registry", registry]
    for name in sets:
        cmd += ["--expert-set", name]
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    logf = open(log_path, "w")  # noqa: SIM115 - handed to the child, closed in stop_server
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc._expertlib_log = logf  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url: str, timeout_s: float, log_path: Path) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s (log: {log_path})")


def stop_server(proc, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = getattr(proc, "_expertlib_log", None)
    if log is not None:
        log.close()


def ask_server(
    url: str, tasks: Sequence[str], s: DemoSettings
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Ask each task's first `s.ask` eval questions through the openai client, per set and base."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="not-needed")
    rows: list[dict] = []
    acc: dict[str, dict[str, float]] = {}
    for task in tasks:
        t = get_task(task)
        from expertlib.demo.evaluate import answer_budget

        every = t.split(n_train=0, n_eval=s.n_eval, seed=s.seed).eval
        exs = every[: s.ask]
        budget = answer_budget(every)  # the in-process evaluation's token budget, so answers compare
        acc[task] = {}
        for model in (task, BASE_NAME):
            correct = 0
            for ex in exs:
                resp = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": ex.prompt}],
                    max_tokens=budget,
                    temperature=0.0,
                )
                got = resp.choices[0].message.content or ""
                ok = bool(t.score(got, ex.answer))
                correct += ok
                rows.append(
                    {
                        "task": task,
                        "model": model,
                        "prompt": ex.prompt,
                        "expected": ex.answer,
                        "answer": got.strip(),
                        "correct": ok,
                    }
                )
            acc[task]["set" if model == task else "base"] = round(correct / max(1, len(exs)), 4)
    return rows, acc


def _wait_interruptible(proc) -> None:
    """Wait for the server child until SIGINT or SIGTERM (even where the shell ignored SIGINT)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(
    s: DemoSettings | None = None,
    *,
    log: Callable[[str], None] = print,
    on_served: Callable[[DemoReport], None] | None = None,
) -> DemoReport:
    """Run the whole demo (see the module docstring); returns what it measured.

    With `serve_forever`, `on_served(report)` is called once the questions are answered, before
    the server is left running until SIGINT/SIGTERM.
    """
    from expertlib.demo.evaluate import evaluate
    from expertlib.registry import Registry
    from expertlib.registry.diff import plot_diff

    s = s or DemoSettings()
    t_start = time.perf_counter()
    workdir = Path(s.workdir) if s.workdir else cache_dir() / "demo" / ("quick" if s.quick else "full")
    workdir.mkdir(parents=True, exist_ok=True)
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

    log(f"[2/5] training ESFT-{s.score} expert sets: {', '.join(s.tasks)}")
    t0 = time.perf_counter()
    paths = {}
    for task in s.tasks:
        paths[task], report.sets[task] = train_task_set(base, task, workdir, s, log=log)
    report.timings["train_s"] = round(time.perf_counter() - t0, 1)

    log("[3/5] publishing to the registry")
    reg = Registry(s.registry)
    for task, p in paths.items():
        entry = reg.publish(p, tags=["demo"], base=base)
        report.sets[task]["ref"] = str(entry.ref)
        log(f"  {entry.ref}  ({report.sets[task]['size_bytes'] / 1024:.0f} KiB) in {reg.root}")
    if len(s.tasks) >= 2:  # a diff needs two sets
        diff = reg.diff([report.sets[t]["ref"] for t in s.tasks], base=base, base_dir=base)
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

    if s.server:
        log("[5/5] serving: `expertlib serve` with every set, asked through the openai client")
        t0 = time.perf_counter()
        port = report.port = s.port or _free_port()
        log_path = workdir / "server.log"
        proc, url = start_server(
            base, str(reg.root), [report.sets[t]["ref"] for t in s.tasks], port, log_path
        )
        try:
            wait_ready(proc, url, s.server_timeout_s, log_path)
            log(f"  ready at {url} after {time.perf_counter() - t0:.0f} s; web view: {url}/ui")
            report.served, report.served_accuracy = ask_server(url, s.tasks, s)
            for row in report.served:  # the same question answered in process (transformers)
                column = "base" if row["model"] == BASE_NAME else str(paths[row["task"]])
                local = {d["prompt"]: d["prediction"] for d in res.samples[column][row["task"]]}
                row["in_process"] = local.get(row["prompt"], "").strip()
            if s.serve_forever:
                if on_served is not None:
                    on_served(report)
                log(f"  serving at {url}/v1 (models: {BASE_NAME}, {', '.join(s.tasks)}); Ctrl-C stops")
                _wait_interruptible(proc)
        except KeyboardInterrupt:
            pass
        except Exception as exc:  # reported, not hidden: the in-process numbers above still stand
            report.server_error = f"{type(exc).__name__}: {exc}"
            log(f"  server step failed: {report.server_error}")
        finally:
            stop_server(proc)
        report.timings["serve_s"] = round(time.perf_counter() - t0, 1)
    else:
        log("[5/5] serving skipped (--no-server)")
    report.timings["total_s"] = round(time.perf_counter() - t_start, 1)
    (workdir / "demo_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return report
