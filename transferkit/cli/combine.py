"""Combining trained models: `ensemble` (average their probabilities) and `soup` (average their weights)."""

from __future__ import annotations

import click

from transferkit import params
from transferkit.cli.group import main

MODELS = click.argument("models", nargs=-1, required=True, metavar="MODEL...")
DEVICE = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
BATCH = click.option("--batch-size", default=32, show_default=True, type=params.BATCH_SIZE.click_type())
WORKERS = click.option("--workers", default=None, type=params.WORKERS.click_type(),
                       help="Image decoding workers (default: CPU count - 1, at most 8).")


@main.command()
@MODELS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New model folder for the ensemble.")
@click.option("--data", type=click.Path(exists=True), default=None,
              help="Labelled images to score the members and the ensemble on (needed by --selection greedy).")
@click.option("--split", default="val", show_default=True, help="The split of --data that scores and selects.")
@click.option("--selection", type=params.ENSEMBLE_SELECTION.click_type(), default="uniform", show_default=True,
              help="uniform weights, or greedy forward selection with replacement on the split's log loss.")
@click.option("--rounds", type=params.ENSEMBLE_ROUNDS.click_type(), default=20, show_default=True,
              help="greedy: members added, one per round (the best round is kept).")
@BATCH
@WORKERS
@DEVICE
def ensemble(models, out, data, split, selection, rounds, batch_size, workers, device):
    """Average several trained models (run folders, SVM folders, any mix of one task and class list) on their
    calibrated probabilities, into a model folder that evaluate and predict take like any other.

    \b
    Examples:
      transferkit ensemble runs/a runs/b svm/c --out runs/ens
      transferkit ensemble runs/a runs/b runs/c --data ./roads --selection greedy --out runs/ens
      transferkit evaluate --model runs/ens --data ./roads --split test
    """
    from transferkit.combine.ensemble import build_ensemble
    from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

    folder = build_ensemble(models, out, data=data, split=split, selection=selection, rounds=rounds,
                            batch_size=batch_size, workers=workers, device=device)
    metadata = read_checkpoint_metadata(find_checkpoint(folder))
    for member in metadata["members"]:
        click.echo(f"  weight {member['weight']:.3f}  {member['path']}")
    report = metadata["chosen_on"]
    if report:
        best = max(report["members"], key=lambda s: s["accuracy"])
        combined = report["ensemble"]
        click.echo(f"{report['split']} ({report['images']} images): best member accuracy {best['accuracy']:.4f} "
                   f"NLL {best['nll']:.4f}; ensemble accuracy {combined['accuracy']:.4f} NLL {combined['nll']:.4f} "
                   f"ECE {combined['ece']:.4f}")
    click.echo(f"ensemble of {len(metadata['members'])} models written to {folder}")


@main.command()
@MODELS
@click.option("--data", required=True, type=click.Path(exists=True),
              help="The data the runs were trained on: its val split ranks them and accepts each ingredient.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New model folder for the soup.")
@click.option("--recipe", type=params.SOUP_RECIPE.click_type(), default="greedy", show_default=True,
              help="greedy: a run joins only if val accuracy does not drop; uniform: average all.")
@BATCH
@WORKERS
@DEVICE
def soup(models, data, out, recipe, batch_size, workers, device):
    """Average the weights of finetuned runs of one backbone (same pretrained weights, e.g. a sweep's trials or
    several seeds) into one model at the cost of one.

    \b
    Examples:
      transferkit soup runs/lr-1e-3 runs/lr-3e-4 runs/seed-1 --data ./roads --out runs/soup
      transferkit soup sweeps/study/trials/* --data ./roads --recipe uniform --out runs/soup-uniform
    """
    from transferkit.combine.soup import make_soup
    from transferkit.models.saved_model import find_checkpoint, read_checkpoint_metadata

    folder = make_soup(models, out, data=data, recipe=recipe, batch_size=batch_size, workers=workers, device=device)
    info = read_checkpoint_metadata(find_checkpoint(folder))["soup"]
    for member in info["members"]:
        mark = "in soup" if member["in_soup"] else "left out"
        click.echo(f"  {mark:8s}  val accuracy {member['val']['accuracy']:.4f}  NLL {member['val']['nll']:.4f}  "
                   f"{member['path']}")
    bn = "; BatchNorm statistics re-estimated on train" if info["bn_reestimated"] else ""
    click.echo(f"soup of {sum(m['in_soup'] for m in info['members'])} runs: val accuracy {info['val']['accuracy']:.4f} "
               f"NLL {info['val']['nll']:.4f}{bn}; written to {folder}")
