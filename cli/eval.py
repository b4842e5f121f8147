"""`expertlib eval`: exact-match accuracy of a base and its expert sets on the toy tasks."""

from __future__ import annotations

import click

from expertlib.cli.output import emit, json_option, print_table


@click.command("eval")
@click.argument("base")
@click.option(
    "--expert-set",
    "-e",
    "expert_sets",
    multiple=True,
    help="Expert set to evaluate besides the base: a registry name (task, task@3) or a .safetensors path. Repeatable.",
)
@click.option(
    "--tasks",
    "-t",
    multiple=True,
    help="Tasks to evaluate (names, or the groups general, specialised, all). Repeatable; default all.",
)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N eval samples of each task.")
@click.option("--n-eval", type=int, default=100, show_default=True, help="Size of each task's eval split.")
@click.option("--registry", default=None, help="Registry folder (default: $EXPERTLIB_REGISTRY).")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to run: auto (CUDA when present), cpu, cuda or cuda:N.",
)
@json_option
def eval_cmd(base, expert_sets, tasks, limit, n_eval, registry, device, as_json) -> None:
    """Exact-match accuracy of BASE and of each expert set on each toy task's eval split.

    Specialised tasks show what each set learned; general tasks show how much general ability
    the base keeps with the set applied. Greedy decoding, batched.

    Example: expertlib eval ~/.cache/expertlib/demo/base-xxxx -e caesar -e mul --tasks caesar --tasks general
    """
    from expertlib.demo.evaluate import evaluate

    tasks = [t for group in tasks for t in group.split(",") if t] or None
    result = evaluate(
        base,
        list(expert_sets),
        tasks=tasks,
        limit=limit,
        n_eval=n_eval,
        registry=registry,
        progress=not as_json,
        device=device,
    )
    emit(
        as_json,
        result.to_dict(),
        lambda _: print_table(
            f"exact-match accuracy on {base}", ["task", "kind", *result.columns], result.rows()
        ),
    )


COMMANDS = [eval_cmd]
