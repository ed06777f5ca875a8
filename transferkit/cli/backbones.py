"""`transferkit backbones`: list timm names, show a backbone's size and preprocessing."""

from __future__ import annotations

import json

import click

from transferkit.cli.group import main
from transferkit.cli.options import weights_options
from transferkit.errors import TransferkitError
from transferkit.models import names as backbone_names  # light: no timm, no torch


class _ListByDefault(click.Group):
    """`backbones PATTERN` lists; `backbones info NAME` and friends are subcommands."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_ListByDefault, epilog="""\b
Examples:
  transferkit backbones '*efficientnet_lite*'     # names, those with weights here marked
  transferkit backbones --local                   # only the ones this machine has weights for
  transferkit backbones info tf_efficientnet_lite0""")
def backbones():
    """List timm backbones (`backbones [PATTERN] [--pretrained]`) or inspect one (`backbones info NAME`)."""


@backbones.command("list", epilog="""\b
Examples:
  transferkit backbones '*efficientnet_lite*'
  transferkit backbones --local          # the ones this machine has weights for
  transferkit backbones 'resnet*' --pretrained""")
@click.argument("pattern", required=False, default="")
@click.option("--pretrained", is_flag=True, help="Only names with pretrained weights (on the hub or here).")
@click.option("--local", is_flag=True, help="Only names whose weights are on this machine: $TRANSFERKIT_WEIGHTS_DIR "
                                            "or the Hugging Face hub cache.")
def list_cmd(pattern, pretrained, local):
    """List backbone names matching PATTERN (shell-style, e.g. '*efficientnet*'); those with weights on this
    machine are marked with where (and, for a weights file, its parameter count)."""
    found = backbone_names.matching(pattern, pretrained=pretrained)
    files, cached = backbone_names.local_weights(), backbone_names.hub_cached()
    if local:
        found = [name for name in found if name in files or name in cached]
    if not found:
        raise TransferkitError(f"no backbone matches {pattern!r}"
                               + (" with local weights" if local else "") + "; try a broader pattern such as '*net*'")
    width = max(len(name) for name in found) + 2
    for name in found:
        click.echo((name.ljust(width) + _where(name, files, cached)).rstrip())


def _where(name: str, files: dict, cached: set) -> str:
    """``4.7 M params  weights folder: FILE`` / ``hub cache``: how a backbone would load here without a network."""
    if name in files:
        count = backbone_names.parameter_count(files[name])
        return (f"{count / 1e6:5.1f} M params  " if count else "") + f"$TRANSFERKIT_WEIGHTS_DIR: {files[name]}"
    return "hub cache" if name in cached else ""


@backbones.command("info", epilog="""\b
Examples:
  transferkit backbones info tf_efficientnet_lite0
  transferkit backbones info resnet50 --weights resnet50.safetensors --json""")
@click.argument("name")
@weights_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(name, as_json, **weights):
    """Parameter count, feature dimension and the resolved data config of NAME."""
    from transferkit.models.backbones import backbone_info

    info = backbone_info(name, **weights)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"backbone      {info['backbone']}")
    click.echo(f"parameters    {info['params']:,} (without classifier)")
    click.echo(f"feature dim   {info['feature_dim']}")
    click.echo(f"weights       {info['weights']}")
    if info["model_kwargs"]:
        click.echo(f"model kwargs  {info['model_kwargs']}")
    for key, value in info["data_config"].items():
        click.echo(f"{key:<13} {value}")


@backbones.command("filters")
@click.argument("name")
@weights_options
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file for the filter grid.")
def filters_cmd(name, out, **weights):
    """The first convolution layer's filters of NAME as an image grid (a quick check that real weights loaded)."""
    from transferkit.core.fileio import check_plot_file
    from transferkit.models.backbones import backbone_identity, load_backbone
    from transferkit.reports.plots import filters_png
    from transferkit.use.explain import first_conv_weight

    check_plot_file(out, "--out")
    model, _ = load_backbone(name, num_classes=0, **weights)
    weight = first_conv_weight(model)
    filters_png(weight, out)
    click.echo(f"wrote {out}: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]} of {name} "
               f"({backbone_identity(model)['weights']})")
