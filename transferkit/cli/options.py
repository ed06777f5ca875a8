"""Option groups shared by several commands, defined once, and the one way a default is written in --help."""

from __future__ import annotations

import click


def with_default(help: str, default) -> str:
    """``help [default: VALUE]``, values spelt as in a recipe (true/false, unset): every flag writes it so."""
    shown = "unset" if default is None or default == "" else str(default).lower() if isinstance(default, bool) else default
    return f"{help} [default: {shown}]"


def weights_option_list() -> list:
    """--weights / --weights-config / --pretrained, as option decorators (finetune puts them in its Model group)."""
    return [
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help=with_default("Local weights: .safetensors, or a .pth/.pt state dict, or a transferkit "
                                       "checkpoint; unset: $TRANSFERKIT_WEIGHTS_DIR/<backbone>.safetensors, "
                                       "else the hub.", None)),
        click.option("--weights-config", type=click.Path(dir_okay=False), default=None,
                     help=with_default("JSON stating what a bare weights file needs: {model_kwargs: {...}, "
                                       "data_config: {mean, std, ...}}; a sidecar <weights>.json is read "
                                       "automatically.", None)),
        click.option("--pretrained/--no-pretrained", default=True,
                     help=with_default("--no-pretrained starts from random weights (no download).", True)),
    ]


def weights_options(func):
    """--weights / --weights-config / --no-pretrained, passed on as load_backbone keywords."""
    return _apply(func, weights_option_list())


def tracking_options(func):
    """--track/--no-track, --tracking-uri, --experiment for the commands that log one MLflow run."""
    return _apply(func, [
        click.option("--track/--no-track", default=True, help=with_default("Log the run to MLflow.", True)),
        click.option("--tracking-uri", default=None,
                     help=with_default("MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.",
                                       None)),
        click.option("--experiment", default=None,
                     help=with_default("MLflow experiment name; unset: the dataset folder's name.", None)),
    ])


def _apply(func, options: list):
    for option in reversed(options):  # decorators apply bottom-up: reversed, the flags keep this order in --help
        func = option(func)
    return func
