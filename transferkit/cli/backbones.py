"""`transferkit backbones`: list timm names, show a backbone's size and preprocessing."""

from __future__ import annotations

import json

import click

from transferkit.cli.group import main
from transferkit.cli.options import weights_options
from transferkit.errors import TransferkitError


class _ListByDefault(click.Group):
    """`backbones PATTERN` lists; `backbones info NAME` and friends are subcommands."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_ListByDefault)
def backbones():
    """List timm backbones (`backbones [PATTERN] [--pretrained]`) or inspect one (`backbones info NAME`)."""


@backbones.command("list")
@click.argument("pattern", required=False, default="")
@click.option("--pretrained", is_flag=True, help="Only names with pretrained weights.")
def list_cmd(pattern, pretrained):
    """List backbone names matching PATTERN (shell-style, e.g. '*efficientnet*')."""
    from transferkit.models.backbones import list_backbones

    names = list_backbones(pattern, pretrained=pretrained)
    if not names:
        raise TransferkitError(f"no backbone matches {pattern!r}; try a broader pattern such as '*net*'")
    click.echo("\n".join(names))


@backbones.command("info")
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
    from transferkit.models.backbones import backbone_identity, load_backbone
    from transferkit.reports.plots import filters_png
    from transferkit.use.explain import first_conv_weight

    model, _ = load_backbone(name, num_classes=0, **weights)
    weight = first_conv_weight(model)
    filters_png(weight, out)
    click.echo(f"wrote {out}: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]} of {name} "
               f"({backbone_identity(model)['weights']})")
