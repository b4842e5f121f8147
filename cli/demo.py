"""`expertlib demo`: from nothing to a served multi-task expert library, in one command."""

from __future__ import annotations

import click

from expertlib.cli.options import field_options, registry_option
from expertlib.cli.output import emit_json, json_option, print_table
from expertlib.esft.pipeline import SelectionConfig


@click.command("demo")
@click.option("--quick", is_flag=True, help="Reduced size for CI: small base, short training, few questions.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="Specialised task to train an expert set for (repeatable; default sum, fill, cross).",
)
@click.option(
    "--steps", type=int, default=None, help="ESFT training steps per task (default: train's, 500; quick 100)."
)
@click.option("--lr", type=float, default=None, help="ESFT learning rate (default 3e-3, toy scale).")
@field_options(SelectionConfig, "score", "top_p")
@registry_option
@click.option(
    "--keep-serving/--no-keep-serving",
    default=True,
    show_default=True,
    help="Leave the server running after the demo, for the web view (`expertlib demo --stop` stops it; "
    "the next demo replaces it).",
)
@click.option("--stop", is_flag=True, help="Stop the server a demo left running, and do nothing else.")
@click.option("--port", type=int, default=0, help="Server port (default: a free one).")
@click.option("--no-server", is_flag=True, help="Skip the serving step (evaluate in process only).")
@json_option
def demo_cmd(
    quick, tasks, steps, lr, score, top_p, registry, keep_serving, stop, port, no_server, as_json
) -> None:
    """Build a small MoE, train ESFT expert sets for toy tasks, publish, serve and ask them.

    Installs the small Qwen2-MoE base shipped with expertlib (pretrained on general toy tasks of
    three domains; digest-checked) and shows how its experts specialise, trains an ESFT expert
    set for each specialised task (printing its retention risk), publishes them to the
    registry, draws their expert overlap, measures every set against the base, then starts
    `expertlib serve` and asks each task through the OpenAI client: naming its expert set, with
    model="auto" (the server picks the set from the prompt's routing), and naming the base; the
    first two tasks also composed (model="sum+fill"). The server is left running for its web
    view at the printed URL until `expertlib demo --stop` (or the next demo).

    Example: expertlib demo --quick
    """
    from expertlib.demo.run import DemoSettings, run_demo
    from expertlib.demo.serving import print_kept, stop_kept

    if stop:
        print_kept(stop_kept(), log=click.echo)
        return

    settings = DemoSettings(
        quick=quick,
        score=score,
        top_p=top_p,
        steps=steps,
        lr=lr,
        registry=registry,
        keep_serving=keep_serving,
        port=port,
        server=not no_server,
        **({"tasks": tuple(tasks)} if tasks else {}),
    )
    report = run_demo(settings, log=lambda msg: click.echo(msg, err=as_json))
    emit_json(report.to_dict()) if as_json else _render(report)
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
                r["served_by"],
                r.get("prompt", ""),
                r.get("expected", ""),
                r.get("answer", r.get("error")),
                "yes" if r.get("correct") else "no",
                r.get("in_process"),
            ]
            for r in report.served
        ]
        print_table(
            "asked through the server (openai client)",
            ["task", "model", "served by", "prompt", "expected", "answer", "ok", "in process"],
            rows,
        )
        ways = list(dict.fromkeys(w for a in report.served_accuracy.values() for w in a))
        rows = [
            [t, *(f"{a[w]:.2f}" if w in a else "" for w in ways)] for t, a in report.served_accuracy.items()
        ]
        print_table(
            "served accuracy: the set named, model=auto (and how often it picked the set), the base, composed",
            ["task", *ways],
            rows,
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
    click.echo(f"total time: {report.timings['total_s']:.0f} s  ({steps})")
    if report.kept:
        click.echo(f"\nthe server keeps running at {report.url}/v1 (models: demo-base, auto, the sets, a+b)")
        for what, link in report.ui.items():
            click.echo(f"  {what}: {link}")
        click.echo("stop it with `expertlib demo --stop` (or `make demo-stop`); the next demo replaces it")


COMMANDS = [demo_cmd]
