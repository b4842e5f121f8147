"""`expertlib eval`: a base and its expert sets side by side, on the toy tasks or on your own jsonl."""

from __future__ import annotations

import click

from expertlib.cli.options import field_options, registry_option
from expertlib.cli.output import emit, json_option, print_table
from expertlib.esft.pipeline import DataConfig, RuntimeConfig


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
    help="Tasks to evaluate (names, or the groups general, domain, specialised, all). Repeatable; default all.",
)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N eval samples of each task.")
@click.option("--n-eval", type=int, default=100, show_default=True, help="Size of each task's eval split.")
@registry_option
@field_options(RuntimeConfig, "device")
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Your own jsonl (the training formats): exact match, contains, answer loss and perplexity instead of the toy tasks.",
)
@click.option(
    "--url",
    default=None,
    help="With --data: measure a running `expertlib serve` at this URL (-e names its models).",
)
@click.option("--api-key", default=None, envvar="EXPERTLIB_API_KEY", help="With --url: the server's API key.")
@click.option(
    "--max-new-tokens",
    type=int,
    default=None,
    help="With --data: answer length (default: longest reference + 4).",
)
@field_options(DataConfig, "max_length")
@click.option(
    "--record",
    is_flag=True,
    help="Keep each expert set's scores with its registry version (task, metric, value, data digest, "
    "date): `expertlib list`, `show` and the web view show them. The sets must be registry names.",
)
@json_option
def eval_cmd(
    base,
    expert_sets,
    tasks,
    limit,
    n_eval,
    registry,
    device,
    data,
    url,
    api_key,
    max_new_tokens,
    max_length,
    record,
    as_json,
) -> None:
    """Exact-match accuracy of BASE and of each expert set on each toy task's eval split.

    Specialised tasks show what each set learned; general tasks show how much general ability
    the base keeps with the set applied. Greedy decoding, batched.

    With --data, the same side-by-side on your own jsonl: each record's last assistant turn is the
    reference answer (exact match, contains) and all answer tokens give the loss and perplexity;
    with --url through a running server, exactly as it serves.

    Example: expertlib eval ~/.cache/expertlib/demo/base-xxxx -e sum -e fill --tasks sum --tasks general

    Example: expertlib eval ./base --data qa.jsonl -e qa --url http://127.0.0.1:8000 --json

    Example: expertlib eval ./base -e sum@2 -e sum@3 --tasks sum --record   # then: expertlib show sum
    """
    reg = None
    if record:  # the exact versions, named before evaluating: the scores go where they were measured
        reg, expert_sets = _registry_versions(registry, base, expert_sets)
    if data is not None:
        return _eval_data(
            base,
            data,
            expert_sets,
            url,
            api_key,
            registry,
            device,
            limit,
            max_new_tokens,
            max_length,
            as_json,
            reg,
        )
    from expertlib.demo.evaluate import evaluate

    tasks = [t for group in tasks for t in group.split(",") if t] or None
    result = evaluate(
        base,
        list(expert_sets),
        tasks=tasks,
        limit=limit,
        n_eval=n_eval,
        open_named=_registry_open(registry, base),
        progress=not as_json,
        device=device,
        keep_samples=record,
    )
    if reg is not None:
        from expertlib.registry.evals import accuracy_records

        for ref in expert_sets:
            records = accuracy_records(result.accuracy[ref], result.samples[ref], source="expertlib eval")
            reg.record_evals(ref, records, base=base)
        _say_recorded(expert_sets, as_json)
    emit(
        as_json,
        result.to_dict(),
        lambda _: print_table(
            f"exact-match accuracy on {base}", ["task", "kind", *result.columns], result.rows()
        ),
    )


def _eval_data(
    base, data, expert_sets, url, api_key, registry, device, limit, max_new_tokens, max_length, as_json, reg
):
    from expertlib.evaluation import evaluate_data

    result = evaluate_data(
        base,
        data,
        list(expert_sets),
        url=url,
        api_key=api_key,
        open_named=_registry_open(registry, base),
        limit=limit,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        device=device,
        progress=not as_json,
    )
    title = f"{data}: {result.n_samples} samples, {result.answer_tokens} answer tokens" + (
        f" via {url}" if url else ""
    )
    if reg is not None:
        from pathlib import Path

        from expertlib.esft.data import data_digest
        from expertlib.registry.evals import make_records

        task = Path(data).stem
        for ref in expert_sets:
            records = make_records(
                {task: result.metrics[ref]},
                data_digests={task: data_digest(data)},
                n={task: result.n_samples},
                source="expertlib eval --data" + (f" via {url}" if url else ""),
            )
            reg.record_evals(ref, records, base=_base_filter(base))
        _say_recorded(expert_sets, as_json)
    emit(as_json, result.to_dict(), lambda _: print_table(title, ["metric", *result.columns], result.rows()))


def _registry_open(registry, base):
    """How `-e NAME` opens a set that is not a file: from the registry, among BASE's sets."""
    from expertlib.registry import Registry

    return lambda ref: Registry(registry).open(ref, base=base)


def _base_filter(base: str):
    """BASE as a registry base filter: a model folder; anything else (a hub id) filters nothing."""
    from pathlib import Path

    return base if Path(base, "config.json").is_file() else None


def _registry_versions(registry, base, expert_sets):
    """(registry, each set as the exact name@version it resolves to now); a file path is refused."""
    from pathlib import Path

    from expertlib.errors import InvalidNameError
    from expertlib.registry import Registry

    reg = Registry(registry)
    refs = []
    for ref in expert_sets:
        if Path(ref).suffix == ".safetensors" or Path(ref).exists():
            raise InvalidNameError(
                f"--record keeps scores with registry versions; {ref!r} is a file",
                hint="publish it (expertlib publish FILE) and evaluate it by its registry name",
            )
        refs.append(str(reg.resolve(ref, base=_base_filter(base)).ref))
    if not refs:
        raise InvalidNameError("--record needs expert sets to record", hint="name them with -e NAME")
    return reg, tuple(refs)


def _say_recorded(refs, as_json: bool) -> None:
    if not as_json:
        click.echo(f"recorded the scores of {', '.join(refs)} in the registry", err=True)


COMMANDS = [eval_cmd]
