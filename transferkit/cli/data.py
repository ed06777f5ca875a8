"""`transferkit data check` (counts, corrupt files, byte duplicates, leakage) and `data audit` (label errors,
near-duplicates, outliers on frozen features)."""

from __future__ import annotations

import json

import click

from transferkit import params
from transferkit.cli.group import main
from transferkit.cli.options import tracking_options, weights_options
from transferkit.features.audit import (  # light: numpy only
    DEFAULT_FOLDS,
    DEFAULT_PIXEL_THRESHOLD,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP,
)


@main.group()
def data():
    """Inspect a dataset before training."""


@data.command("check")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--img-size", type=params.IMG_SIZE.click_type(), default=224, show_default=True,
              help="Backbone input size; images under half of it are flagged.")
@click.option("--max-imbalance", type=float, default=3.0, show_default=True,
              help="Warn when the largest train class exceeds the smallest by more than this ratio.")
@click.option("--val-ratio", type=params.VAL_RATIO.click_type(), default=0.0, show_default=True,
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


@data.command("audit")
@click.argument("path", type=click.Path())
@click.option("--backbone", required=True, help="timm backbone whose frozen features describe the images.")
@weights_options
@click.option("--features", type=click.Path(dir_okay=False), default=None,
              help="Reuse a `transferkit extract` file of this data, backbone and weights (refused otherwise).")
@click.option("--out", type=click.Path(file_okay=False), default="audit", show_default=True,
              help="Folder for report.json, embedding_map.png, gallery.png (and the features it extracts).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--top", type=params.TOPK.click_type(), default=DEFAULT_TOP, show_default=True,
              help="Suspects per kind printed and shown in the gallery (report.json lists all).")
@click.option("--threshold", type=params.SIMILARITY_THRESHOLD.click_type(), default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine similarity of (centred) embeddings at or above which two images are near-duplicates.")
@click.option("--pixel-threshold", type=params.SIMILARITY_THRESHOLD.click_type(), default=DEFAULT_PIXEL_THRESHOLD,
              show_default=True, help="Thumbnail correlation at or above which two images are near-duplicates "
                                      "(catches resized / re-encoded copies).")
@click.option("--folds", type=params.CV_FOLDS.click_type(), default=DEFAULT_FOLDS, show_default=True,
              help="Cross-validation folds for the out-of-fold label probabilities.")
@click.option("--write-clean", type=click.Path(dir_okay=False), default=None,
              help="Write a path,label,split CSV without the flagged images (for `finetune --data`).")
@click.option("--relabel", is_flag=True, help="With --write-clean: keep label suspects under their suggested label.")
@click.option("--val-ratio", type=params.VAL_RATIO.click_type(), default=0.2, show_default=True,
              help="Share of train carved out as val when the data has no val split (as finetune does).")
@click.option("--seed", type=params.SEED.click_type(), default=0, show_default=True)
@click.option("--batch-size", type=params.BATCH_SIZE.click_type(), default=32, show_default=True)
@click.option("--workers", type=params.WORKERS.click_type(), default=None, help="DataLoader workers [default: CPUs-1, max 8].")
@click.option("--device", default="auto", show_default=True)
@tracking_options
def audit_cmd(path, backbone, as_json, top, track, **options):
    """Find likely label errors, near-duplicates (leakage across splits, conflicts across classes) and
    outliers in PATH with a frozen backbone. Images are never modified.

    Exit code: 0 nothing found, 1 suspects found, 2 errors.
    """
    from transferkit.features.audit import audit

    report = audit(path, backbone, top=top, track=track, **options)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_audit(report, top)
    raise SystemExit(report.exit_code)


def _print_audit(report, top: int) -> None:
    summary = report.summary
    click.echo(f"dataset   {report.dataset}: {report.images} images, {len(report.classes)} classes")
    click.echo(f"features  {report.features} ({report.backbone}) [{report.timings['features_s']:.1f}s; "
               f"analysis {report.timings['analysis_s']:.1f}s]")
    click.echo(f"near-duplicates (embedding cosine >= {report.threshold} or thumbnail correlation >= "
               f"{report.pixel_threshold}): {summary['duplicate_groups']} groups, "
               f"{summary['leakage_groups']} across splits (leakage), {summary['conflict_groups']} across classes")
    for group in report.near_duplicates[:top]:
        kind = "+".join(k for k in ("leakage", "conflict") if group[k]) or "duplicate"
        files = ", ".join(f"{f['split']}/{f['label']}:{f['path']}" for f in group["files"][:4])
        more = f" (+{len(group['files']) - 4})" if len(group["files"]) > 4 else ""
        click.echo(f"  {kind:<16} {group['max_similarity']:.3f}  {files}{more}")
    check = report.label_check
    click.echo(f"label issues: {summary['label_issues']}" + (f" (skipped: {check['skipped']})" if "skipped" in check
               else f" (out-of-fold accuracy {check['out_of_fold_accuracy']:.3f}, {check['folds']} folds)"))
    for suspect in report.label_issues[:top]:
        click.echo(f"  {suspect['score']:.3f}  {suspect['label']} -> {suspect['suggested']}  "
                   f"{suspect['split']}:{suspect['path']}")
    click.echo(f"outliers: {summary['outliers']}")
    for outlier in report.outliers[:top]:
        click.echo(f"  {outlier['score']:.3f}  {outlier['split']}/{outlier['label']}:{outlier['path']}")
    for name, location in report.files.items():
        click.echo(f"{name:<14} {location}")
    if report.exit_code:
        _explain_audit_scores(report)
    click.echo("clean" if report.exit_code == 0 else "suspects found (exit 1)")


# --- issue 25: what the printed scores mean, against the thresholds, and the next step ---
def _explain_audit_scores(report) -> None:
    from transferkit.features.label_issues import OUTLIER_FENCE

    cutoff = f"{report.outlier_cutoff:.2f}" if report.outlier_cutoff is not None else "the cutoff"
    click.echo("how to read the scores:")
    click.echo(f"  near-duplicates: similarity of the group's closest pair, flagged from {report.threshold} (embedding "
               f"cosine) or {report.pixel_threshold} (thumbnail correlation); 1.000 is the same picture. Leakage: one "
               "image in two splits, so val/test scores are inflated")
    click.echo("  label issues: the probability a cross-validated classifier gives the folder's label (0-1, low = "
               "likely mislabelled); listed when it suggests another class, lowest first")
    click.echo(f"  outliers: mean cosine distance to the nearest images, flagged above {cutoff} "
               f"(the median + {OUTLIER_FENCE:g} robust standard deviations of this dataset); high = unlike the rest")
    if "clean_csv" not in report.files:
        click.echo(f"next: transferkit data audit {report.dataset} --backbone {report.backbone} --write-clean "
                   "clean.csv   (keeps one image per "
                   "near-duplicate group, drops outliers and label suspects; --relabel keeps those under the "
                   "suggested label), then finetune --data clean.csv")
