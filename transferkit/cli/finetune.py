"""`transferkit finetune` and `transferkit lr-find`: train a timm backbone with a new head on an image folder.

Every :class:`transferkit.train.config.TrainConfig` key is a flag here, generated from the config's own fields
(``--key-name VALUE``, booleans as ``--key/--no-key``), and may also be given Ultralytics-style as ``key=value``
arguments. Either way the value goes through the same checks as a recipe key. Options left unset fall back to
the recipe (``--recipe``), then to the built-in defaults. Under ``torchrun --nproc-per-node N -m transferkit
finetune`` the same command trains with DistributedDataParallel; ``--batch-size`` is then the global batch.
"""

from __future__ import annotations

import dataclasses
import os

import click
import cloup
import yaml

from transferkit.cli.group import main
from transferkit.cli.options import weights_option_list, with_default
from transferkit.train import config as train_config

WEIGHTS_KEYS = ("weights", "weights_config", "pretrained")  # from the shared weights_option_list
# --help's sections, essentials first in each; a key not named here is in Advanced (tests check every key is shown)
HELP_GROUPS = {
    "Data": ("data", "val_ratio", "img_size", "resize_mode", "bad_images", "allow_leakage", "cache", "workers"),
    "Model": ("backbone", *WEIGHTS_KEYS, "strategy", "lp_ft", "freeze_epochs"),
    "Training": ("recipe", "epochs", "batch_size", "lr", "optimizer", "scheduler", "early_stopping", "monitor",
                 "weight_decay", "label_smoothing", "balance", "seed", "device"),
    "Augmentation": ("aug", "mixup", "cutmix"),
    "Output and tracking": ("out", "name", "track", "tracking_uri", "experiment", "register"),
}
ADVANCED = "Advanced"
RECIPE_OPTION = click.option(
    "--recipe", type=click.Path(dir_okay=False),
    help=with_default("YAML recipe file, or a bundled one by name (quick-cpu, linear-probe, roads-resnet50); flags "
                      "and KEY=VALUE settings override it.", None))
FINETUNE_EXAMPLES = """\b
Examples:
  # the bundled demo data and real weights from a local folder, 3 epochs on CPU
  TRANSFERKIT_WEIGHTS_DIR=weights/ transferkit finetune --data demo/roads --backbone tf_efficientnet_lite0 --epochs 3
  # a bundled recipe, with settings written Ultralytics-style
  transferkit finetune --recipe quick-cpu --data photos/ epochs=5 lr=3e-4
  # frozen backbone and a linear head (features extracted once), untracked
  transferkit finetune --data labels.csv --backbone resnet50 --strategy linear-probe --no-track
"""


def config_option(spec: dataclasses.Field, default=None):
    """The flag of one config key, typed by the constraint the key declares, so a flag and a recipe line are
    refused with the same message. ``default``: what the help names as the default, where a command's differs."""
    flag = "--" + spec.name.replace("_", "-")
    shown = spec.default if default is None else default
    if train_config.value_type(spec.name) is bool:
        return click.option(f"{flag}/--no-{spec.name.replace('_', '-')}", spec.name, default=None,
                            help=with_default(spec.metadata["help"], shown))
    return click.option(flag, spec.name, default=None, type=train_config.CONSTRAINTS[spec.name].click_type(),
                        help=_help(spec, shown))


def _help(spec: dataclasses.Field, shown) -> str:
    """The field's help, its range for a number, and its default."""
    text = spec.metadata["help"]
    if spec.default == "":  # backbone, data
        return f"{text} [required, here or in the --recipe]"
    if train_config.value_type(spec.name) in (int, float):
        text = f"{text} ({train_config.CONSTRAINTS[spec.name].description})"
    return with_default(text, shown)


def finetune_options(**more):
    """The inputs finetune and lr-find share, grouped for --help: recipe, weights, every config key, KEY=VALUE
    settings; ``more`` adds a command's own options to a group (``Advanced=[...]``)."""
    options = {"recipe": RECIPE_OPTION, **dict(zip(WEIGHTS_KEYS, weights_option_list())),
               **{spec.name: config_option(spec) for spec in dataclasses.fields(train_config.TrainConfig)
                  if spec.name not in WEIGHTS_KEYS}}
    named = {key for keys in HELP_GROUPS.values() for key in keys}
    sections = {**{title: [options[key] for key in keys] for title, keys in HELP_GROUPS.items()},
                ADVANCED: [option for key, option in options.items() if key not in named]}
    for title, extra in more.items():
        sections[title] = sections[title] + list(extra)

    def decorate(func):
        func = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(func)
        for title, group in reversed(sections.items()):  # applied bottom-up: reversed, Data comes first
            func = cloup.option_group(title, *group)(func)
        return func

    return decorate


finetune_command = finetune_options()


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


def check_before_torch(config) -> None:
    """A misspelt backbone or a data folder of the wrong layout fails in well under a second, before torch loads
    (the run checks both again, with everything else)."""
    from transferkit.data.discover import discover
    from transferkit.models.names import check_name

    check_name(config.backbone)
    discover(config.data, val_ratio=config.val_ratio, seed=config.seed)


def _main_process() -> bool:
    """Rank 0 under torchrun (or no torchrun), known from its environment without importing torch."""
    return os.environ.get("RANK", "0") == "0"


@main.command(epilog=FINETUNE_EXAMPLES)
@finetune_options(**{ADVANCED: [
    click.option("--resume", type=click.Path(file_okay=False),
                 help=with_default("Continue the unfinished run in this folder.", None)),
    click.option("--allow-data-change", is_flag=True,
                 help=with_default("With --resume: continue even though the data changed since the run started.",
                                   False)),
]})
def finetune(recipe, resume, allow_data_change, overrides, **options):
    """Finetune BACKBONE on DATA; writes runs/<name>/ (checkpoints, metrics.csv, curves.png, config.yaml).

    Any setting may also be given as KEY=VALUE (e.g. `lr=3e-4 aug=none`), checked like a recipe key.
    """
    from transferkit.errors import TransferkitError

    if resume:
        config = train_config.resume_config(resume, command_line_settings(overrides, options))
    else:
        config = resolve_options(recipe, overrides, options)
    if allow_data_change and not resume:
        raise TransferkitError("--allow-data-change only applies with --resume")
    check_before_torch(config)
    if _main_process():
        click.echo(f"finetune {config.backbone} on {config.data}: importing torch and timm …", err=True)
    from transferkit.core import distributed
    from transferkit.train import finetune as run_finetune

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
    from transferkit.core.fileio import check_plot_file
    from transferkit.train import find_lr

    check_plot_file(plot, "--plot")
    config = resolve_options(recipe, overrides, options)
    finding = find_lr(config, plot=plot)
    click.echo(f"suggested lr {finding.suggestion:.2e} after {len(finding.lrs)} steps; loss against LR in {plot}")
