"""`transferkit extract` (frozen features to parquet/npz) and `transferkit svm` (a classical head on them)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from transferkit import params
from transferkit.cli.group import main
from transferkit.cli.options import tracking_options, weights_options
from transferkit.errors import TransferkitError


def extraction_options(func):
    """How images become vectors; shared by `extract` and the `svm --backbone --data` shortcut."""

    @click.option("--backbone", help="timm backbone name, e.g. tf_efficientnet_lite0.")
    @click.option("--data", type=click.Path(), help="Image folder (class folders or train/val/test) or labels CSV.")
    @weights_options
    @click.option("--pool", type=params.POOL.click_type(), default="avg", show_default=True,
                  help="Global pooling of the last feature map; token = a ViT's class token.")
    @click.option("--layer", default=None, help="Pool an intermediate stage instead (timm feature_info name, e.g. blocks.4).")
    @click.option("--tta", type=params.FEATURE_TTA.click_type(), default="none", show_default=True,
                  help="hflip: average the vectors of each image and its mirror.")
    @click.option("--resize-mode", type=params.RESIZE_MODE.click_type(), default=None,
                  help="How images fit the input [default: the backbone's own, crop for most].")
    @click.option("--batch-size", type=params.BATCH_SIZE.click_type(), default=32, show_default=True)
    @click.option("--workers", type=params.WORKERS.click_type(), default=None, help="DataLoader workers [default: CPUs-1, max 8].")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
    @click.option("--val-ratio", type=params.VAL_RATIO.click_type(), default=0.2, show_default=True,
                  help="Share of train carved out as val when the data has no val split.")
    @click.option("--seed", type=params.SEED.click_type(), default=0, show_default=True, help="Seed of that val split.")
    @click.option("--force", is_flag=True, help="Recompute even if an up-to-date output exists.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@main.command("extract")
@extraction_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file: .parquet or .npz.")
@click.option("--split", type=params.FEATURE_SPLIT.click_type(), default="all", show_default=True)
@click.option("--dtype", type=params.FEATURE_DTYPE.click_type(), default="float32", show_default=True)
def extract_cmd(backbone, data, out, **options):
    """Write one feature vector per image (with path, label, split) for a frozen backbone.

    Under `torchrun --nproc-per-node N -m transferkit extract ...` the images are shared across the
    processes and rank 0 writes one file, the same as a single-process run.
    """
    import time

    from transferkit.core import distributed
    from transferkit.features.extract import extract_features
    from transferkit.features.feature_file import read_metadata

    _require(backbone=backbone, data=data)
    started = time.perf_counter()
    before = _file_version(Path(out))
    path = extract_features(backbone, data, out, **options)
    if distributed.is_main():
        metadata = read_metadata(path)
        status = "reused (up to date)" if _file_version(path) == before else "recomputed"
        click.echo(f"{metadata['rows']} images x {metadata['feature_dim']} features ({metadata['pool']}) -> {path} "
                   f"{status} [{time.perf_counter() - started:.1f}s]")


def _file_version(path: Path):
    """Identity of the file at ``path`` now: a rewrite (always a rename onto it) gives a new inode."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@main.command("svm")
@click.option("--features", type=click.Path(dir_okay=False), help="Features file from `transferkit extract`.")
@extraction_options
@click.option("--model", "head_model", type=params.HEAD_MODEL.click_type(), default="logistic", show_default=True,
              help="linear-svm / rbf-svm get Platt-scaled probabilities; logistic its own.")
@click.option("--cv", type=params.CV_FOLDS.click_type(), default=5, show_default=True,
              help="Stratified folds for the grid search on train (capped by the smallest class).")
@click.option("--grid", default=None, help="Search space, e.g. 'C=0.01,0.1,1' or 'C=1,10;gamma=scale,0.01'.")
@click.option("--jobs", type=int, default=-1, show_default=True,
              help="Folds of the grid search fitted in parallel (-1: one per CPU core).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Model folder, which must not exist yet [default: runs/svm-<backbone>-<model>-<dataset>, "
                   "numbered if taken].")
@tracking_options
def svm_cmd(features, backbone, data, head_model, cv, grid, jobs, out, track, tracking_uri, experiment, **options):
    """Fit an SVM / logistic head on frozen features and save it as a model for predict/evaluate.

    Either --features FILE, or --backbone NAME --data PATH (extracts into the model folder, then fits).
    """
    from transferkit.features.svm_training import train_svm

    if features:
        _refuse_extraction_options(options)
    result = train_svm(features, backbone=backbone, data=data, model=head_model, cv=cv, grid=grid, n_jobs=jobs,
                       out=out, track=track, tracking_uri=tracking_uri, experiment=experiment, **options)
    _print_result(result)
    if result.mlflow_run_id:
        click.echo(f"MLflow run {result.mlflow_run_id} (model {result.model_uri})")


def _refuse_extraction_options(options) -> None:
    """A features file already fixed pooling, TTA, resize... : say so rather than silently ignore the flags."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [name for name in options
             if name not in ("weights", "seed") and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise TransferkitError(f"{flags} only apply when svm extracts (--backbone/--data); "
                               "the features file already fixed them: re-run `transferkit extract` to change them")


def _require(**values) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        raise TransferkitError(f"missing {' and '.join(missing)}")


def _print_result(result) -> None:
    params = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    click.echo(f"{result.model}: {params} (cv accuracy {result.cv_accuracy:.3f}, {result.cv_folds} folds)")
    for split, scores in result.metrics.items():
        click.echo(f"{split:<5} accuracy {scores['accuracy']:.3f}  balanced {scores['balanced_accuracy']:.3f}  "
                   f"macro-F1 {scores['macro_f1']:.3f}  (n={scores['n']})")
        width = max(len(name) for name in scores["per_class"]) + 2
        for name, row in scores["per_class"].items():
            click.echo(f"  {name:<{width}} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
                       f"f1 {row['f1']:.3f}  n={row['support']}")
        click.echo(f"  confusion (rows true): {scores['confusion_matrix']}")
    click.echo(f"model -> {result.out}")
