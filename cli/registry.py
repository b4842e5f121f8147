"""Registry commands: publish, list, show, diff, tag, rm, gc, verify, push, pull, import-esft,
export-esft.

Each command parses, calls one method of `expertlib.registry.Registry`, and formats.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from expertlib.cli.options import registry_option as shared_registry_option
from expertlib.cli.output import emit, emit_json, json_option, print_table
from expertlib.sizing import format_bytes


def registry_option(fn):
    """`--registry DIR` (the one `expertlib.cli.options.registry_option`); passes `reg`."""

    @shared_registry_option
    @functools.wraps(fn)
    def wrapper(*args, registry, **kwargs):
        from expertlib.registry import Registry

        return fn(*args, reg=Registry(registry), **kwargs)

    return wrapper


base_option = click.option(
    "--base",
    default=None,
    help="Base model: a model folder, a base name or a config digest (chooses among bases).",
)
token_option = click.option(
    "--token",
    default=None,
    envvar="EXPERTLIB_REMOTE_TOKEN",
    help="Bearer token for an HTTP registry [env EXPERTLIB_REMOTE_TOKEN]; HF token for hf://.",
)


def _entry_line(e) -> str:
    tags = f" ({', '.join(e.tags)})" if e.tags else ""
    return f"{e.ref}{tags}  {e.digest[:19]}...  {e.num_experts} experts in {len(e.experts)} layers, {format_bytes(e.size)}"


@click.command("publish")
@click.argument("patch", type=click.Path(exists=True, dir_okay=False))
@click.option("--task", default=None, help="Registry name (default: the task in the patch manifest).")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable).")
@click.option(
    "--base",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Refuse unless the patch was made for this base model folder.",
)
@registry_option
@json_option
def publish_cmd(
    patch: str, task: str | None, tags: tuple[str, ...], base: str | None, reg, as_json: bool
) -> None:
    """Validate PATCH (an expert-set .safetensors) and store it as the next version of its task.

    Example: expertlib publish math.safetensors --tag stable --registry ./reg
    """
    from tqdm import tqdm

    size = Path(patch).stat().st_size
    # shown once the copy has taken a second (delay), on stderr; never with --json
    with tqdm(total=size, unit="B", unit_scale=True, delay=1, disable=as_json, leave=False) as bar:
        entry = reg.publish(patch, task=task, tags=tags, base=base, progress=bar.update)
    emit(as_json, entry.summary(), lambda _: click.echo(f"published {_entry_line(entry)}"))


@click.command("list")
@base_option
@click.option("--name", default=None, help="Only the versions of this task name.")
@registry_option
@json_option
def list_cmd(base: str | None, name: str | None, reg, as_json: bool) -> None:
    """List published expert sets (every version, with tags and digests).

    Example: expertlib list --base ./models/tiny-qwen2-moe --json
    """
    from expertlib.registry.evals import brief

    entries = reg.list(base=base, name=name)
    evals = reg.evals(entries=entries)

    def render(_):
        if not entries:
            click.echo(f"no expert sets in {reg.root} (publish one with `expertlib publish PATCH`)")
            return
        rows = [
            (
                str(e.ref),
                ", ".join(e.tags),
                e.digest[:19],
                e.base.name or e.base.model_type,
                e.num_experts,
                len(e.experts),
                format_bytes(e.size),
                e.published_at.strftime("%Y-%m-%d %H:%M"),
                brief(evals[e.ref]) or "-",
            )
            for e in entries
        ]
        print_table(
            f"Expert sets in {reg.root}",
            ["set", "tags", "digest", "base", "experts", "layers", "size", "published", "scores"],
            rows,
        )

    data = [{**e.summary(), "evals": [r.model_dump(mode="json") for r in evals[e.ref]]} for e in entries]
    emit(as_json, data, render)


@click.command("show")
@click.argument("ref")
@base_option
@registry_option
@json_option
def show_cmd(ref: str, base: str | None, reg, as_json: bool) -> None:
    """Show one expert set: NAME, NAME@VERSION, NAME@TAG or NAME@blake3:DIGEST (older: @sha256:).

    Example: expertlib show math@2 --json
    """
    e = reg.show(ref, base=base)
    versions = reg.evals(entries=reg.list(base=e.base, name=e.name))

    def render(_):
        m = e.manifest
        rows = [
            ("set", str(e.ref)),
            ("tags", ", ".join(e.tags)),
            ("digest", e.digest),
            ("content digest", e.content_digest),
            ("task (manifest)", m.task),
            ("description", m.description),
            ("base", f"{e.base.name or '-'} ({e.base.model_type}, {e.base.config_digest[:19]}...)"),
            ("experts", f"{m.num_experts} in {len(m.experts)} layers"),
            ("dtype", m.dtype),
            ("size", format_bytes(e.size)),
            ("method", m.provenance.method),
            ("published", e.published_at.isoformat(timespec="seconds")),
            ("source", e.source or "-"),
            ("path", str(reg.get_path(e.ref, base=e.base))),
        ]
        rows += [(f"layer {layer}", ", ".join(map(str, ids))) for layer, ids in m.experts.items()]
        print_table(f"Expert set {e.ref}", ["field", "value"], rows)
        _render_scores(e, versions)

    data = {**e.model_dump(mode="json"), "evals": [r.model_dump(mode="json") for r in versions[e.ref]]}
    emit(as_json, data, render)


def _render_scores(e, versions) -> None:
    """The scores of `e` beside those of the other versions of its name (where any were recorded)."""
    from expertlib.registry.evals import score_table

    shown = {ref: recs for ref, recs in versions.items() if recs}
    if not shown.get(e.ref):
        click.echo(f"no evaluation results recorded for {e.ref} (expertlib eval ... --record)")
        return
    rows, values = score_table(shown)
    refs = sorted(shown, key=lambda r: r.version)
    table = [
        (task, metric, digest[:19] or "-", *(_score(values[r].get((task, metric, digest))) for r in refs))
        for task, metric, digest in rows
    ]
    heads = [f"{r.name}@{r.version}" + (" (this)" if r == e.ref else "") for r in refs]
    print_table(f"Evaluation results of {e.name}", ["task", "metric", "data", *heads], table)


def _score(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


@click.command("diff")
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "--base",
    "base_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Base model folder: also measure how far each set moved from the base.",
)
@click.option(
    "--plot",
    "plot",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a heatmap (layers x experts) to this PNG file.",
)
@click.option(
    "--general",
    default=None,
    help="General reference data (jsonl, or 'builtin' for the demo's): show the share of its routing each "
    "set's experts carry (needs --base).",
)
@registry_option
@json_option
def diff_cmd(
    refs: tuple[str, ...], base_dir: str | None, plot: str | None, general: str | None, reg, as_json: bool
) -> None:
    """Compare two or more expert sets of one base: overlap per layer, weight differences.

    Example: expertlib diff math@1 math@2 code --base ./base --plot overlap.png --general builtin
    """
    if len(refs) < 2:
        raise click.UsageError("diff needs at least two expert sets")
    if general and not base_dir:
        raise click.UsageError("--general needs --base (the routing is measured on the base model)")
    report = reg.diff(list(refs), base=base_dir, base_dir=base_dir)
    if general:
        from expertlib.esft.data import load_tokenizer
        from expertlib.esft.diagnostics import general_routing
        from expertlib.moe import load_model
        from expertlib.registry.diff import add_general_overlap

        model = load_model(base_dir)
        model.float()
        add_general_overlap(report, general_routing(model, load_tokenizer(base_dir), general, base=base_dir))
    if plot:
        from expertlib.registry.diff import plot_diff

        plot_diff(report, plot)
    if as_json:
        emit_json(report.model_dump(mode="json"))
        return
    _render_diff(report)
    if report.general:
        rows = [
            (
                lab,
                f"{g['mean_general_mass']:.3f}",
                f"{g['max_general_mass']:.3f}",
                ",".join(map(str, g["at_risk_layers"])) or "none",
            )
            for lab, g in report.general.items()
        ]
        print_table(
            f"Share of the general data's routing on each set's experts ({general})",
            ["set", "mean over layers", "max", "layers at risk"],
            rows,
        )
    if plot:
        click.echo(f"heatmap written to {plot}")


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.4f}"


def _render_diff(report) -> None:
    rows = [
        (
            lo.layer,
            *(" ".join(map(str, lo.experts[lab])) or "-" for lab in report.labels),
            " ".join(map(str, lo.shared)) or "-",
            _fmt(lo.jaccard),
        )
        for lo in report.layers
    ]
    print_table("Experts retrained per layer", ["layer", *report.labels, "shared", "jaccard"], rows)
    rows = [
        (
            s.label,
            s.num_experts,
            s.layers,
            _fmt(s.fraction_of_routed, pct=True),
            _fmt(s.mean_moved),
            _fmt(s.max_moved),
        )
        for s in report.sets
    ]
    print_table(
        "Sets (moved = ||w - w_base|| / ||w_base||)",
        ["set", "experts", "layers", "of routed", "mean moved", "max moved"],
        rows,
    )
    rows = [
        (
            f"{p.a} vs {p.b}",
            p.shared_experts,
            p.union_experts,
            _fmt(p.jaccard),
            _fmt(p.mean_rel_diff),
            _fmt(p.max_rel_diff),
        )
        for p in report.pairs
    ]
    print_table(
        "Pairs (rel diff = ||a - b|| / ||b|| on shared experts)",
        ["pair", "shared", "union", "jaccard", "mean rel diff", "max rel diff"],
        rows,
    )
    if len(report.labels) > 2:
        rows = [
            (lab, *(f"{v:.2f}" for v in row))
            for lab, row in zip(report.labels, report.overlap_matrix, strict=True)
        ]
        print_table("Overlap matrix (Jaccard)", ["", *report.labels], rows)
    for note in report.notes:
        click.echo(f"note: {note}")


@click.command("tag")
@click.argument("ref")
@click.argument("tag")
@click.option("--delete", is_flag=True, help="Remove TAG from the name of REF instead.")
@base_option
@registry_option
def tag_cmd(ref: str, tag: str, delete: bool, base: str | None, reg) -> None:
    """Point TAG at the version REF names (tags move; `latest` is automatic).

    Example: expertlib tag math@2 stable
    """
    if delete:
        reg.untag(ref.partition("@")[0], tag, base=base)
        click.echo(f"removed tag {tag} of {ref.partition('@')[0]}")
        return
    e = reg.tag(ref, tag, base=base)
    click.echo(f"{e.name}@{tag} -> {e.ref} ({e.digest[:19]}...)")


@click.command("rm")
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True, help="Remove every version of the name REF.")
@base_option
@registry_option
@json_option
def rm_cmd(ref: str, all_versions: bool, base: str | None, reg, as_json: bool) -> None:
    """Remove a version (NAME@VERSION, @TAG or @blake3:...) or, with --all, every version of NAME.

    Blobs stay until `expertlib gc`. Example: expertlib rm math@1
    """
    removed = reg.rm(ref, base=base, all_versions=all_versions)
    emit(as_json, [str(r) for r in removed], lambda d: click.echo("removed " + ", ".join(d)))


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option(
    "--grace", default=3600.0, show_default=True, help="Seconds before an orphaned temp file is stale."
)
@registry_option
@json_option
def gc_cmd(dry_run: bool, grace: float, reg, as_json: bool) -> None:
    """Delete blobs no version uses and leftover temp files.

    Example: expertlib gc --dry-run
    """
    r = reg.gc(grace_s=grace, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    emit(
        as_json,
        r.model_dump(),
        lambda _: click.echo(
            f"{verb} {len(r.removed_blobs)} blobs ({format_bytes(r.freed_bytes)}) and {len(r.removed_temps)} temp files"
        ),
    )


@click.command("verify")
@click.argument("refs", nargs=-1)
@base_option
@registry_option
@json_option
def verify_cmd(refs: tuple[str, ...], base: str | None, reg, as_json: bool) -> None:
    """Recompute the digests of every stored patch (or of REFS); exit 1 if any is damaged.

    Example: expertlib verify
    """
    r = reg.verify(list(refs) or None, base=base)

    def render(_):
        for p in r.problems:
            click.secho(f"DAMAGED {p.digest[:19]}... ({', '.join(p.refs) or '-'}): {p.problem}", fg="red")
        extra = (
            f"; {r.unreferenced} unreferenced blobs, {r.stale_temps} stale temp files (run gc)"
            if r.unreferenced or r.stale_temps
            else ""
        )
        click.echo(
            f"checked {r.checked} blobs: {'all intact' if r.ok else f'{len(r.problems)} damaged'}{extra}"
        )
        if not r.ok:
            click.echo("  hint: pull the damaged sets again from a good copy, or rm them", err=True)

    emit(as_json, {**r.model_dump(), "ok": r.ok}, render)
    if not r.ok:
        raise SystemExit(1)


@click.command("push")
@click.argument("ref")
@click.argument("dest")
@base_option
@click.option("--private", is_flag=True, default=None, help="hf:// only: create the repo private.")
@token_option
@registry_option
@json_option
def push_cmd(
    ref: str, dest: str, base: str | None, private: bool | None, token: str | None, reg, as_json: bool
) -> None:
    """Copy REF to DEST: a registry folder, http(s)://host/prefix, or hf://owner/repo.

    A bare name pushes every version (the Hub gets the latest). Example: expertlib push math /shared/reg
    """
    opts = {"private": private} if private else {}
    r = reg.push(ref, dest, base=base, token=token, progress=not as_json, **opts)
    emit(as_json, r.model_dump(), _render_transfer)


@click.command("pull")
@click.argument("source")
@click.argument("refs", nargs=-1)
@base_option
@token_option
@registry_option
@json_option
def pull_cmd(
    source: str, refs: tuple[str, ...], base: str | None, token: str | None, reg, as_json: bool
) -> None:
    """Copy expert sets from SOURCE (registry folder, http(s)://host/prefix, hf://owner/repo[@rev]).

    Without REFS, everything there; digests are checked before anything is stored.
    Example: expertlib pull /shared/reg math
    """
    r = reg.pull(source, list(refs), base=base, token=token, progress=not as_json)
    emit(as_json, r.model_dump(), _render_transfer)


def _render_transfer(d: dict) -> None:
    click.echo(f"{d['source']} -> {d['dest']}")
    for ref in d["copied"]:
        click.echo(f"  copied  {ref}")
    for ref in d["present"]:
        click.echo(f"  present {ref}")
    if d["tags"]:
        click.echo(f"  tags    {', '.join(d['tags'])}")
    if d.get("url"):
        click.echo(f"  {d['url']}")


@click.command("import-esft")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Base model folder the adapter was trained on.",
)
@click.option("--task", required=True, help="Task name to publish under.")
@click.option(
    "--expert-config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The expert_cfg.json the adapter was trained with (the reference trainer does not save it); "
    "default: the folder's, else inferred from the tensor names.",
)
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable).")
@registry_option
@json_option
def import_esft_cmd(
    folders: tuple[str, ...],
    base: str,
    task: str,
    expert_config: str | None,
    tags: tuple[str, ...],
    reg,
    as_json: bool,
) -> None:
    """Convert reference ESFT adapter folder(s) (safetensors [+ expert_cfg.json]) and publish them.

    Takes an adapter folder, a reference trainer's output (last_checkpoint), legacy `layers.*`
    keys, or the per-rank folders of expert-parallel training (merged into one set).
    Example: expertlib import-esft out/last_checkpoint_ep0 out/last_checkpoint_ep1 --base ./base --task law
    """
    from expertlib.esft.reference import INFERRED, import_esft

    es = import_esft(list(folders), base, task=task, expert_config=expert_config)
    entry = reg.publish(es, task=task, tags=tags, base=base)
    inferred = es.manifest.provenance.extra.get("expert_config") == INFERRED
    if inferred and not as_json:
        click.echo("note: no expert config given or found; inferred it from the tensor names", err=True)
    emit(
        as_json,
        {**entry.summary(), "expert_config_inferred": inferred},
        lambda _: click.echo(f"imported {_entry_line(entry)}"),
    )


@click.command("export-esft")
@click.argument("ref")
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Base model folder the set was made for (gives every MoE layer and the full tensor groups).",
)
@registry_option
@json_option
def export_esft_cmd(ref: str, out: str, base: str, reg, as_json: bool) -> None:
    """Write expert set REF (a registry ref or a patch file) as a folder the reference ESFT code loads.

    OUT gets expert_cfg.json (every MoE layer a key) and model.safetensors (full expert weights
    under the checkpoint's names). Example: expertlib export-esft law@2 ./esft-law --base ./base
    """
    from expertlib.esft.reference import export_esft
    from expertlib.loading import open_expert_set

    es = open_expert_set(ref, open_named=lambda name: reg.open(name, base=base)).expert_set
    folder = export_esft(es, out, base)
    cfg = json.loads((folder / "expert_cfg.json").read_text())
    data = {
        "out": str(folder),
        "task": es.manifest.task,
        "num_experts": es.manifest.num_experts,
        "expert_config": cfg,
    }
    emit(
        as_json,
        data,
        lambda d: click.echo(f"exported {d['task']} ({d['num_experts']} experts) to {d['out']}"),
    )


COMMANDS = [
    publish_cmd,
    list_cmd,
    show_cmd,
    diff_cmd,
    tag_cmd,
    rm_cmd,
    gc_cmd,
    verify_cmd,
    push_cmd,
    pull_cmd,
    import_esft_cmd,
    export_esft_cmd,
]
