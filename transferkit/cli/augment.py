"""`transferkit augment preview`: look at a training augmentation before spending hours on it."""

from __future__ import annotations

import math

import click

from transferkit import params
from transferkit.choices import AUG_PRESETS
from transferkit.cli.group import main
from transferkit.cli.options import weights_options

PREVIEW_VERSIONS = 4  # augmented draws beside each original


@main.group()
def augment():
    """Training augmentation pipelines (presets: none, light, medium, heavy; or an albumentations YAML)."""


@augment.command("preview")
@click.option("--data", required=True, type=click.Path(), help="Image folder (class folders or train/val/test) or labels CSV.")
@click.option("--aug", default="light", show_default=True,
              help=f"Preset ({', '.join(AUG_PRESETS)}) or an albumentations YAML file (A.save(..., data_format='yaml')).")
@click.option("-n", "count", type=params.PREVIEW_SAMPLES.click_type(), default=16, show_default=True,
              help=f"Augmented samples in the grid, {PREVIEW_VERSIONS} per original image.")
@click.option("--seed", type=params.SEED.click_type(), default=0, show_default=True, help="Which images and which random draws.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--backbone", default="tf_efficientnet_lite0", show_default=True,
              help="Its input size, interpolation and mean/std define the tail of the pipeline.")
@weights_options
@click.option("--img-size", type=params.IMG_SIZE.click_type(), default=None, help="Override the backbone's input size.")
@click.option("--resize-mode", type=params.RESIZE_MODE.click_type(), default=None,
              help="How images fit the input [default: the backbone's own, crop for most].")
def preview_cmd(data, aug, count, seed, out, backbone, weights, weights_config, pretrained, img_size, resize_mode):
    """Write a grid of training images to --out: per row, one as validation sees it (captioned with its class),
    then augmented versions of it.

    Only the backbone's preprocessing (size, interpolation, mean/std) is read, from timm or from
    --weights / --weights-config; no weights are downloaded, so --pretrained makes no difference.
    """
    from transferkit.core.fileio import check_plot_file
    from transferkit.models.backbones import load_backbone
    from transferkit.reports.plots import augmentation_preview_png

    check_plot_file(out, "--out")
    _, preprocessing = load_backbone(
        backbone, weights=weights, pretrained=False, weights_config=weights_config,
        data_overrides={"img_size": img_size} if img_size else None, resize_mode=resize_mode,
    )
    path = augmentation_preview_png(data, aug, preprocessing, out, n=count, seed=seed, versions=PREVIEW_VERSIONS)
    click.echo(f"wrote {path} ({math.ceil(count / PREVIEW_VERSIONS)} originals, each beside its augmented versions: "
               f"{count} in all; aug {aug}, {preprocessing.describe()})")


@augment.command("show")
@click.argument("aug")
def show_cmd(aug):
    """Print the YAML of a preset (or check a file): copy it as the start of your own --aug file."""
    from transferkit.data.augment import load_augmentation, preset_path

    load_augmentation(aug)  # a file that does not load fails here, with the reason
    path = preset_path(aug)
    click.echo(f"# {path}")
    click.echo(path.read_text().rstrip())
