"""`transferkit data check`: counts, corrupt files, duplicates and leakage in a dataset."""

from __future__ import annotations

import json

import click

from transferkit.cli import main


@main.group()
def data():
    """Inspect a dataset before training."""


@data.command("check")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--img-size", type=int, default=224, show_default=True,
              help="Backbone input size; images under half of it are flagged.")
@click.option("--max-imbalance", type=float, default=3.0, show_default=True,
              help="Warn when the largest train class exceeds the smallest by more than this ratio.")
@click.option("--val-ratio", type=float, default=0.0, show_default=True,
              help="Carve a val split as finetune would (0: report the splits on disk).")
def check_cmd(path, as_json, img_size, max_imbalance, val_ratio):
    """Check PATH. Exit code: 0 clean, 1 warnings, 2 errors."""
    from transferkit.data.check import check_dataset
    from transferkit.data.discover import discover

    index = discover(path, val_ratio=val_ratio, strict=False)
    report = check_dataset(index, min_side=img_size, max_imbalance=max_imbalance)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    raise SystemExit(report.exit_code)


def _print_report(report) -> None:
    click.echo(f"dataset   {report.root} ({report.layout})")
    splits = list(report.counts)
    width = max(len(c) for c in report.classes) + 2
    click.echo("class".ljust(width) + "".join(s.rjust(8) for s in splits))
    for cls in report.classes:
        click.echo(cls.ljust(width) + "".join(str(report.counts[s][cls]).rjust(8) for s in splits))
    click.echo("total".ljust(width) + "".join(str(sum(report.counts[s].values())).rjust(8) for s in splits))
    click.echo(f"imbalance {report.imbalance_ratio}:1 (train, largest/smallest class)")
    for message in report.errors:
        click.echo(f"ERROR   {message}")
    for message in report.warnings:
        click.echo(f"WARNING {message}")
    for dup in report.duplicates[:10]:
        files = ", ".join(f"{f['split']}/{f['class']}:{f['path']}" for f in dup["files"])
        click.echo(f"  duplicate ({dup['kind']}): {files}")
    for bad in report.unreadable[:10]:
        click.echo(f"  unreadable: {bad['path']}: {bad['error']}")
    click.echo("clean" if report.exit_code == 0 else f"{len(report.errors)} errors, {len(report.warnings)} warnings")
