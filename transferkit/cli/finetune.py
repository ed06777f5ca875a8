"""`transferkit finetune`: train a timm backbone with a new head on an image folder.

Options left unset fall back to the recipe (``--recipe``), then to the built-in defaults
(:class:`transferkit.train.config.TrainConfig`). Under ``torchrun --nproc-per-node N -m transferkit finetune``
the same command trains with DistributedDataParallel; ``--batch-size`` is then the global batch.
"""

from __future__ import annotations

import os

import click

from transferkit import choices
from transferkit.cli import main
from transferkit.cli.options import weights_options


@main.command()
@click.option("--backbone", help="timm model name (see `transferkit backbones`).")
@click.option("--data", type=click.Path(), help="Image folder (class folders or train/val split folders) or labels CSV.")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe (see recipes/); flags override it.")
@weights_options
@click.option("--epochs", type=int, help="Epochs to train (default 10).")
@click.option("--batch-size", type=int, help="Batch size; the global batch under torchrun (default 16).")
@click.option("--accum-steps", type=int, help="Gradient accumulation steps per optimizer step (default 1).")
@click.option("--lr", type=float, help="Learning rate of the head (default 1e-3).")
@click.option("--img-size", type=int, help="Input size instead of the backbone's own.")
@click.option("--strategy", help=f"{' | '.join(choices.STRATEGIES)} (default freeze-unfreeze).")
@click.option("--aug", help=f"Augmentation preset ({', '.join(choices.AUG_PRESETS)}) or albumentations YAML file.")
@click.option("--resize-mode", type=click.Choice(choices.RESIZE_MODES), help="How images fit the input.")
@click.option("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision on GPU (bf16 where supported, else fp16).")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--sync-bn", is_flag=True, default=None, help="SyncBatchNorm across processes under torchrun.")
@click.option("--seed", type=int, help="Random seed (default 0): same seed, same metrics on CPU.")
@click.option("--out", type=click.Path(file_okay=False), help="Parent folder of run folders (default runs/).")
@click.option("--name", help="Run folder name (default <backbone>-<strategy>-<timestamp>).")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the unfinished run in this folder.")
@click.option("--workers", type=int, help="Data loading processes (default: CPU count - 1, at most 8).")
@click.option("--balance", type=click.Choice(choices.BALANCE), help="Class-imbalance handling.")
@click.option("--cache", type=click.Choice(choices.CACHE_MODES), help="Keep decoded images between epochs.")
@click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--experiment", help="MLflow experiment name.")
@click.option("--no-track", is_flag=True, help="Do not log to MLflow.")
@click.option("--register", help="Register the best model in the MLflow model registry under this name.")
def finetune(recipe, resume, no_track, compile_, **options):
    """Finetune BACKBONE on DATA; writes runs/<name>/ (checkpoints, metrics.csv, curves.png, config.yaml)."""
    from transferkit.errors import TransferkitError
    from transferkit.train import finetune as run_finetune
    from transferkit.train.config import resolve_config, resume_config

    options["compile"] = compile_
    options["track"] = False if no_track else None
    if options["pretrained"]:
        options["pretrained"] = None  # the flag's default: leave it to the recipe
    if resume:
        config = resume_config(resume, options)
    else:
        config = resolve_config(recipe, options)
        for key in ("backbone", "data"):
            if not getattr(config, key):
                raise TransferkitError(f"finetune needs --{key} (or a --recipe that sets {key}:)")
    result = run_finetune(config, resume=resume, recipe=recipe)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        click.echo(result.summary())
