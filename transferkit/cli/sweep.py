"""`transferkit sweep`: rank backbones on frozen features, finetune the best, print the leaderboard."""

from __future__ import annotations

import click

from transferkit import params
from transferkit.cli.group import main
from transferkit.cli.options import tracking_options


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


@main.command("sweep")
@click.option("--data", required=True, type=click.Path(), help="Image folder (class folders or train/val) or labels CSV.")
@click.option("--backbones", help="Comma-separated timm names to rank, e.g. tf_efficientnet_lite0,mobilenetv2_100.")
@click.option("--space", "sweep_file", type=click.Path(dir_okay=False),
              help="Sweep YAML file, or a bundled one by name (backbones-cpu, lr-tpe): backbones, top_k, metric, trials, fixed keys, search space.")
@click.option("--strategies", help="Comma-separated strategies to try, e.g. linear-probe,freeze-unfreeze.")
@click.option("--epochs", type=params.EPOCHS.click_type(), help="Epochs per trial.")
@click.option("--top-k", type=params.TOPK.click_type(), help="Backbones finetuned after the stage-1 ranking [default: 2].")
@click.option("--trials", type=params.TRIALS.click_type(), help="Optuna TPE trials in all (pruned by the median rule); default: grid.")
@click.option("--metric", type=params.MONITOR.click_type(),
              help="What ranks the trials (of each trial's best checkpoint) [default: val_accuracy].")
@click.option("--out", type=click.Path(file_okay=False), default="runs/sweeps", show_default=True,
              help="Features, trial run folders and the leaderboard go to OUT/<study>/.")
@click.option("--storage", help="Optuna storage URL shared by several processes, e.g. sqlite:///study.db "
                                "[default: in memory].")
@click.option("--study", help="Study name in that storage; the same name joins or resumes it "
                              "[default: sweep-<data folder> with --storage].")
@click.option("--register", help="Register the winner's model in the MLflow model registry under this name.")
@click.option("--seed", type=params.SEED.click_type(), default=0, show_default=True, help="Seed of the Optuna sampler.")
@click.option("--verbose", is_flag=True, help="Print every epoch of every trial.")
@tracking_options
def sweep_cmd(data, backbones, strategies, **options):
    """Find the best model for DATA: rank BACKBONES by a linear probe on frozen features, finetune the top-k
    over the strategies / search space, print the leaderboard and the winner's run folder.

    Several processes (on several machines) given the same --storage and --study share the trials.
    """
    import optuna

    from transferkit.errors import TransferkitError
    from transferkit.sweep import sweep
    from transferkit.sweep.leaderboard import markdown

    # the sweep prints one line per trial; Optuna's own lines (and failed trials' tracebacks) with --verbose
    optuna.logging.set_verbosity(optuna.logging.INFO if options["verbose"] else optuna.logging.ERROR)
    result = sweep(data, _names(backbones), strategies=_names(strategies), **options)
    click.echo(markdown(result.leaderboard, result.metric))
    winner = result.winner
    if winner is None:
        raise TransferkitError(f"no trial finished; see the errors in {result.folder / 'leaderboard.csv'}",
                               exit_code=1)
    click.echo(f"winner: trial {winner['trial']} ({winner['backbone']}), {result.metric} "
               f"{winner[result.metric]:.4f}, run folder {winner['run_dir']}")
    click.echo(f"leaderboard: {result.folder / 'leaderboard.csv'}")
