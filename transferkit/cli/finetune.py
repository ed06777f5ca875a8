"""`transferkit finetune` and `transferkit lr-find`: train a timm backbone with a new head on an image folder.

Every :class:`transferkit.train.config.TrainConfig` key is a flag here, generated from the config's own fields
(``--key-name VALUE``, booleans as ``--key/--no-key``), and may also be given Ultralytics-style as ``key=value``
arguments. Either way the value goes through the same checks as a recipe key. Options left unset fall back to
the recipe (``--recipe``), then to the built-in defaults. Under ``torchrun --nproc-per-node N -m transferkit
finetune`` the same command trains with DistributedDataParallel; ``--batch-size`` is then the global batch.
"""

from __future__ import annotations

import dataclasses
import functools

import click
import yaml

from transferkit.cli.group import main
from transferkit.cli.options import weights_options
from transferkit.train import config as train_config

WEIGHTS_KEYS = ("weights", "weights_config", "pretrained")  # from the shared weights_options


def config_options(func):
    """One flag per config key, with its help and default, typed by the constraint the key declares, so a flag
    and a recipe line are refused with the same message."""
    for spec in reversed(dataclasses.fields(train_config.TrainConfig)):
        if spec.name in WEIGHTS_KEYS:
            continue
        flag = "--" + spec.name.replace("_", "-")
        if train_config.value_type(spec.name) is bool:
            option = click.option(f"{flag}/--no-{spec.name.replace('_', '-')}", spec.name, default=None,
                                  help=f"{spec.metadata['help']} [default: {_shown(spec.default)}]")
        else:
            option = click.option(flag, spec.name, default=None, type=train_config.CONSTRAINTS[spec.name].click_type(),
                                  help=_help(spec))
        func = option(func)
    return func


def _help(spec: dataclasses.Field) -> str:
    """The field's help, its default and, for a number, its range."""
    shown = f"default: {_shown(spec.default)}"
    if train_config.value_type(spec.name) in (int, float):
        shown = f"{train_config.CONSTRAINTS[spec.name].description}; {shown}"
    return f"{spec.metadata['help']} [{shown}]"


def _shown(default) -> str:
    return "unset" if default is None or default == "" else str(default).lower() if isinstance(default, bool) else str(default)


def parse_overrides(pairs) -> dict:
    """``("lr=3e-4", "aug=none")`` → ``{"lr": 0.0003, "aug": "none"}``; values read as YAML, like a recipe line."""
    from transferkit.errors import TransferkitError

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise TransferkitError(f"unexpected argument {pair!r}; give settings as key=value (e.g. lr=3e-4) or --flags")
        try:
            values[key.strip().replace("-", "_")] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            values[key.strip().replace("-", "_")] = text
    return values


def finetune_command(func):
    """The inputs finetune and lr-find share: recipe, weights, every config key, key=value overrides."""

    @click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe file, or a bundled one by name (quick-cpu, linear-probe, roads-resnet50); flags override it.")
    @weights_options
    @config_options
    @click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def command_line_settings(overrides, options: dict) -> dict:
    """The settings given on the command line, as key=value arguments or flags (unset flags left out)."""
    given = {**parse_overrides(overrides), **{k: v for k, v in options.items() if v is not None}}
    if given.get("pretrained") is True:
        given.pop("pretrained")  # the flag's default: leave it to the recipe
    return given


def resolve_options(recipe, overrides, options: dict):
    """The config of a new run from the command line: defaults < recipe < key=value and flags."""
    from transferkit.errors import TransferkitError

    config = train_config.resolve_config(recipe, command_line_settings(overrides, options))
    for key in ("backbone", "data"):
        if not getattr(config, key):
            raise TransferkitError(f"finetune needs --{key} (or a --recipe that sets {key}:)")
    return config


@main.command()
@finetune_command
@click.option("--resume", type=click.Path(file_okay=False), help="Continue the unfinished run in this folder.")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: continue even though the data changed since the run started.")
def finetune(recipe, resume, allow_data_change, overrides, **options):
    """Finetune BACKBONE on DATA; writes runs/<name>/ (checkpoints, metrics.csv, curves.png, config.yaml).

    Any setting may also be given as KEY=VALUE (e.g. `lr=3e-4 aug=none`), checked like a recipe key.
    """
    from transferkit.core import distributed
    from transferkit.errors import TransferkitError
    from transferkit.train import finetune as run_finetune

    if resume:
        config = train_config.resume_config(resume, command_line_settings(overrides, options))
    else:
        config = resolve_options(recipe, overrides, options)
    if allow_data_change and not resume:
        raise TransferkitError("--allow-data-change only applies with --resume")
    result = run_finetune(config, resume=resume, recipe=recipe, allow_data_change=allow_data_change)
    if distributed.is_main():  # under torchrun only rank 0 reports
        click.echo(result.summary())


@main.command("lr-find")
@finetune_command
@click.option("--plot", type=click.Path(dir_okay=False), default="lr_find.png", show_default=True,
              help="Where to write the PNG of training loss against LR.")
def lr_find(recipe, overrides, plot, **options):
    """LR range test on the model, data and strategy finetune would train; prints the suggested --lr.

    `finetune --lr auto` runs the same test before training and stores the result in the run.
    """
    from transferkit.train import find_lr

    config = resolve_options(recipe, overrides, options)
    finding = find_lr(config, plot=plot)
    click.echo(f"suggested lr {finding.suggestion:.2e} after {len(finding.lrs)} steps; loss against LR in {plot}")
