"""`transferkit extract` (frozen features to parquet/npz) and `transferkit svm` (a classical head on them)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from transferkit import choices
from transferkit.cli import main
from transferkit.cli.options import tracking_options, weights_options
from transferkit.core.fileio import safe_name
from transferkit.errors import TransferkitError


def extraction_options(func):
    """How images become vectors; shared by `extract` and the `svm --backbone --data` shortcut."""

    @click.option("--backbone", help="timm backbone name, e.g. tf_efficientnet_lite0.")
    @click.option("--data", type=click.Path(), help="Image folder (class folders or train/val/test) or labels CSV.")
    @weights_options
    @click.option("--pool", type=click.Choice(choices.POOLS), default="avg", show_default=True,
                  help="Global pooling of the last feature map; token = a ViT's class token.")
    @click.option("--layer", default=None, help="Pool an intermediate stage instead (timm feature_info name, e.g. blocks.4).")
    @click.option("--tta", type=click.Choice(choices.FEATURE_TTA_MODES), default="none", show_default=True,
                  help="hflip: average the vectors of each image and its mirror.")
    @click.option("--resize-mode", type=click.Choice(choices.RESIZE_MODES), default=None,
                  help="How images fit the input [default: the backbone's own, crop for most].")
    @click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
    @click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers [default: CPUs-1, max 8].")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
    @click.option("--val-ratio", type=float, default=0.2, show_default=True,
                  help="Share of train carved out as val when the data has no val split.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of that val split.")
    @click.option("--force", is_flag=True, help="Recompute even if an up-to-date output exists.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@main.command("extract")
@extraction_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file: .parquet or .npz.")
@click.option("--split", type=click.Choice(choices.FEATURE_SPLITS), default="all", show_default=True)
@click.option("--dtype", type=click.Choice(choices.FEATURE_DTYPES), default="float32", show_default=True)
def extract_cmd(backbone, data, out, **options):
    """Write one feature vector per image (with path, label, split) for a frozen backbone.

    Under `torchrun --nproc-per-node N -m transferkit extract ...` the images are shared across the
    processes and rank 0 writes one file, the same as a single-process run.
    """
    import time

    from transferkit.core import distributed
    from transferkit.features.extract import extract_features, read_metadata

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
@click.option("--model", "head_model", type=click.Choice(choices.HEAD_MODELS), default="logistic", show_default=True,
              help="linear-svm / rbf-svm get Platt-scaled probabilities; logistic its own.")
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True,
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
    from transferkit.core.fileio import atomic_dir
    from transferkit.features.classical_heads import fit_head, parse_grid
    from transferkit.features.extract import extract_features, read_metadata

    if features and (backbone or data):
        raise TransferkitError("pass either --features FILE or --backbone/--data, not both")
    if features:
        _refuse_extraction_options(options)
    if not features:
        _require(backbone=backbone, data=data)
    if track:  # before minutes of extraction and fitting, not after the model is saved
        from transferkit.tracking.runs import check_tracking_store

        check_tracking_store(tracking_uri)
    parse_grid(grid, head_model)  # a bad --grid fails before the extraction too
    out = Path(out) if out else _new_model_folder(backbone or read_metadata(features)["backbone"], head_model,
                                                  data or read_metadata(features)["dataset"]["root"])
    with atomic_dir(out) as folder:  # the folder appears complete, or not at all
        if not features:
            features = extract_features(backbone, data, folder / "features.parquet", **options)
        feature_metadata = read_metadata(features)
        result = fit_head(features, head_model, cv=cv, grid=grid, out=folder, weights=options["weights"],
                          seed=options["seed"], n_jobs=jobs)
    result.out = out
    _print_result(result)
    if track:
        _track(result, feature_metadata, tracking_uri=tracking_uri, experiment=experiment)


def _new_model_folder(backbone: str, head_model: str, dataset) -> Path:
    """``runs/svm-<backbone>-<model>-<dataset>``, numbered when taken: a second svm never replaces the first."""
    from transferkit.core.fileio import free_name
    from transferkit.tracking.runs import default_experiment_name

    parent = Path("runs")
    return parent / free_name(parent, safe_name(f"svm-{backbone}-{head_model}-{default_experiment_name(dataset)}"))


def _track(result, feature_metadata, *, tracking_uri, experiment) -> None:
    """The fitted head as an MLflow run: search space and choice, val/test metrics and confusion matrices,
    a description, the model itself."""
    import tempfile

    from transferkit.reports.metrics import split_scores
    from transferkit.reports.plots import confusion_matrix_png
    from transferkit.tracking.runs import default_experiment_name, default_run_name, run_tags, start_run
    from transferkit.tracking.summary import evaluation_line, run_description

    dataset = feature_metadata["dataset"]
    backbone, class_names = feature_metadata["backbone"], feature_metadata["class_names"]
    params = {"backbone": backbone, "weights": feature_metadata["weights"],
              "pool": feature_metadata["pool"], "layer": feature_metadata["layer"], "tta": feature_metadata["tta"],
              "head_model": result.model, "cv_folds": result.cv_folds,
              **{f"head_{k}": v for k, v in result.best_params.items()}}
    tags = run_tags(backbone=backbone, strategy=f"svm-{result.model}", dataset_fingerprint=dataset["fingerprint"])
    with start_run("svm", tracking_uri=tracking_uri, experiment=experiment or default_experiment_name(dataset["root"]),
                   run_name=default_run_name(backbone, f"svm-{result.model}"), tags=tags,
                   params=params, system_metrics=False) as tracker, tempfile.TemporaryDirectory() as tmp:
        tracker.log_metrics({"cv_accuracy": result.cv_accuracy})
        lines, headline = [], {"cv_accuracy": result.cv_accuracy}
        for split, scores in result.metrics.items():
            plots = Path(tmp) / split
            confusion_matrix_png(scores["confusion_matrix"], class_names, plots / "confusion_matrix.png", normalize=False)
            confusion_matrix_png(scores["confusion_matrix"], class_names, plots / "confusion_matrix_normalized.png")
            named = split_scores(split, scores)
            tracker.log_evaluation(named, artifacts_dir=plots)
            lines.append(evaluation_line(named, artifacts=split)[2:])
            headline.update({k: named[k] for k in (f"{split}_accuracy", f"{split}_macro_f1")})
        uri = tracker.log_model(result.out / "model.safetensors")
        chosen = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
        tracker.set_description(run_description(
            f"{backbone} · svm-{result.model} on {Path(dataset['root']).name}",
            [f"head: {result.model} ({chosen}), chosen by {result.cv_folds}-fold cross-validation on train",
             f"features: `{feature_metadata['pool']}` pooling of frozen `{backbone}` on `{dataset['root']}`, "
             f"{len(class_names)} classes", *lines, f"model: `{uri}`"],
            headline))
    click.echo(f"MLflow run {tracker.run_id} (model {uri})")


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
