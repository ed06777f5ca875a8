"""Option groups shared by several commands, defined once."""

from __future__ import annotations

import functools

import click


def weights_options(func):
    """--weights / --weights-config / --no-pretrained, passed on as load_backbone keywords."""

    @click.option("--weights", type=click.Path(dir_okay=False), default=None,
                  help="Local weights: .safetensors, or a .pth/.pt state dict, or a transferkit checkpoint.")
    @click.option("--weights-config", type=click.Path(dir_okay=False), default=None,
                  help="JSON stating what a bare weights file needs: {model_kwargs: {...}, data_config: {mean, std, ...}}. "
                       "A sidecar <weights>.json is read automatically.")
    @click.option("--pretrained/--no-pretrained", default=True, show_default=True,
                  help="--no-pretrained starts from random weights (no download).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def tracking_options(func):
    """--track/--no-track, --tracking-uri, --experiment for the commands that log one MLflow run."""

    @click.option("--track/--no-track", default=True, show_default=True, help="Log the run to MLflow.")
    @click.option("--tracking-uri", default=None,
                  help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
    @click.option("--experiment", default=None, help="MLflow experiment name [default: the dataset folder's name].")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper
