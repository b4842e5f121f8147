"""`expertlib demo`: from nothing to a served multi-task expert library, in one command."""

from __future__ import annotations

import click

from expertlib.cli.output import emit_json, print_table


@click.command("demo")
@click.option("--quick", is_flag=True, help="Reduced size for CI: small base, short training, few questions.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="Specialised task to train an expert set for (repeatable; default sum, fill, cross).",
)
@click.option(
    "--steps", type=int, default=None, help="ESFT training steps per task (default 300, quick 100)."
)
@click.option("--lr", type=float, default=None, help="ESFT learning rate (default 3e-3, toy scale).")
@click.option("--score", type=click.Choice(["token", "gate"]), default="token", show_default=True)
@click.option(
    "--top-p", type=float, default=None, help="Selection threshold p (default: 0.2 token, 0.1 gate)."
)
@click.option(
    "--registry", default=None, help="Registry folder to publish to (default: $EXPERTLIB_REGISTRY)."
)
@click.option("--serve", "serve_forever", is_flag=True, help="Keep serving after the demo (Ctrl-C stops).")
@click.option("--port", type=int, default=0, help="Server port (default: a free one).")
@click.option("--no-server", is_flag=True, help="Skip the serving step (evaluate in process only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON at the end.")
def demo_cmd(
    quick, tasks, steps, lr, score, top_p, registry, serve_forever, port, no_server, as_json
) -> None:
    """Build a small MoE, train ESFT expert sets for toy tasks, publish, serve and ask them.

    Installs the small Qwen2-MoE base shipped with expertlib (pretrained on general toy tasks of
    three domains; digest-checked) and shows how its experts specialise, trains an ESFT expert
    set for each specialised task (printing its retention risk), publishes them to the
    registry, draws their expert overlap, measures every set against the base, then starts
    `expertlib serve` and asks each task through the OpenAI client by naming its expert set (and
    the base, for contrast).

    Example: expertlib demo --quick
    """
    from expertlib.demo.run import DemoSettings, run_demo

    settings = DemoSettings(
        quick=quick,
        score=score,
        top_p=top_p,
        steps=steps,
        lr=lr,
        registry=registry,
        serve_forever=serve_forever,
        port=port,
        server=not no_server,
        **({"tasks": tuple(tasks)} if tasks else {}),
    )
    shown = []

    def show(report) -> None:
        shown.append(True)
        emit_json(report.to_dict()) if as_json else _render(report)

    report = run_demo(settings, log=lambda msg: click.echo(msg, err=as_json), on_served=show)
    if not shown:
        show(report)
    elif not as_json:
        click.echo(f"total time: {report.timings['total_s']:.0f} s")
    if report.server_error:
        raise SystemExit(1)


def _render(report) -> None:
    columns = list(report.accuracy)
    rows = [[t, *(f"{report.accuracy[c][t]:.2f}" for c in columns)] for t in report.accuracy["base"]]
    print_table("exact-match accuracy (in process): base vs each expert set", ["task", *columns], rows)
    if report.served:
        rows = [
            [
                r["task"],
                r["model"],
                r["prompt"],
                r["expected"],
                r["answer"],
                "yes" if r["correct"] else "no",
                r.get("in_process"),
            ]
            for r in report.served
        ]
        print_table(
            "asked through the server (openai client)",
            ["task", "model", "prompt", "expected", "answer", "ok", "in process"],
            rows,
        )
        acc = report.served_accuracy
        click.echo(
            "served accuracy: "
            + "; ".join(f"{t}: set {a['set']:.2f} vs base {a['base']:.2f}" for t, a in acc.items())
        )
    if report.server_error:
        click.secho(f"server step failed: {report.server_error}", fg="red", err=True)
    risky = {t: s["retention_risk"] for t, s in report.sets.items() if s.get("retention_risk")}
    if risky:
        rows = [
            [
                t,
                ",".join(str(n) for n in s["experts_per_layer"].values()),
                f"{r['mean_general_mass']:.2f}",
                f"{r['max_general_mass']:.2f}",
                ",".join(map(str, r["at_risk_layers"])) or "none",
            ]
            for t, r in risky.items()
            for s in [report.sets[t]]
        ]
        print_table(
            "retention risk: share of the general data's routing on each set's experts",
            ["set", "experts/layer", "mean", "max", "layers at risk"],
            rows,
        )
    if report.heatmap:
        click.echo(f"expert-overlap heatmap: {report.heatmap}")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in report.timings.items() if k != "total_s")
    if "total_s" in report.timings:
        click.echo(f"total time: {report.timings['total_s']:.0f} s  ({steps})")
    else:
        click.echo(f"time so far: {steps}")


COMMANDS = [demo_cmd]
