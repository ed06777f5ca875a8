"""`transferkit sweep`: rank backbones on frozen features, finetune the best, print the leaderboard.

Every finetune key the sweep does not set itself is a flag here too (``--batch-size 8``, generated as finetune's
are) or a ``key=value`` argument: a fixed setting of every trial, checked as finetune checks it, over the sweep
file's ``fixed:``. The sweep's own ``--seed`` seeds its sampler; the trials' training seed is ``seed=N``.
"""

from __future__ import annotations

import dataclasses

import click
import cloup

from transferkit import params
from transferkit.cli.finetune import command_line_settings, config_option
from transferkit.cli.group import main
from transferkit.cli.options import tracking_options
from transferkit.sweep.space import NOT_SEARCHED
from transferkit.train.config import TrainConfig

# finetune keys as fixed-setting flags: not those the sweep sets for each trial, nor seed (--seed is the sampler's)
FIXED_FLAGS = tuple(spec.name for spec in dataclasses.fields(TrainConfig) if spec.name not in (*NOT_SEARCHED, "seed"))
SWEEP_DEFAULTS = {"monitor": "the sweep's --metric"}  # where a trial's default is not finetune's


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


@main.command("sweep")
@cloup.option_group(
    "Sweep",
    click.option("--data", required=True, type=click.Path(), help="Image folder (class folders or train/val) or labels CSV."),
    click.option("--backbones", help="Comma-separated timm names to rank, e.g. tf_efficientnet_lite0,mobilenetv2_100."),
    click.option("--space", "sweep_file", type=click.Path(dir_okay=False),
                 help="Sweep YAML file, or a bundled one by name (backbones-cpu, lr-tpe): backbones, top_k, metric, trials, fixed keys, search space."),
    click.option("--strategies", help="Comma-separated strategies to try, e.g. linear-probe,freeze-unfreeze."),
    click.option("--top-k", type=params.TOPK.click_type(), help="Backbones finetuned after the stage-1 ranking [default: 2]."),
    click.option("--trials", type=params.TRIALS.click_type(), help="Optuna TPE trials in all (pruned by the median rule); default: grid."),
    click.option("--metric", type=params.MONITOR.click_type(),
                 help="What ranks the trials (of each trial's best checkpoint) [default: val_accuracy]."),
    click.option("--out", type=click.Path(file_okay=False), default="runs/sweeps", show_default=True,
                 help="Features, trial run folders and the leaderboard go to OUT/<study>/."),
    click.option("--storage", help="Optuna storage URL shared by several processes, e.g. sqlite:///study.db "
                                   "[default: in memory]."),
    click.option("--study", type=params.STUDY_NAME.click_type(),
                 help="Study name in that storage (a name, not a path: its folder is OUT/<study>); the same name joins "
                      "or resumes it [default: sweep-<data folder> with --storage]."),
    click.option("--allow-data-change", is_flag=True,
                 help="Continue a study made for other data (another fingerprint or classes) knowingly."),
    click.option("--register", help="Register the winner's model in the MLflow model registry under this name."),
    click.option("--seed", type=params.SEED.click_type(), default=0, show_default=True, help="Seed of the Optuna sampler (the trials' own: the setting seed=N)."),
    click.option("--ensemble", type=params.SWEEP_ENSEMBLE.click_type(), metavar="K",
                 help="Then average the best K trials' models (weights chosen on val) into OUT/<study>/ensemble."),
    click.option("--verbose", is_flag=True, help="Print every epoch of every trial."),
)
@tracking_options
@cloup.option_group("Fixed settings of every trial (finetune's flags; KEY=VALUE works too)",
                    *(config_option(spec, default=SWEEP_DEFAULTS.get(spec.name)) for spec in dataclasses.fields(TrainConfig)
                      if spec.name in FIXED_FLAGS))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def sweep_cmd(data, backbones, strategies, overrides, **options):
    """Find the best model for DATA: rank BACKBONES by a linear probe on frozen features, finetune the top-k
    over the strategies / search space, print the leaderboard and the winner's run folder.

    Finetune's flags and KEY=VALUE settings (`--batch-size 8 lr=3e-4`) fix a setting of every trial, over the
    --space file's fixed: keys. Several processes (on several machines) given the same --storage and --study
    share the trials.
    """
    import optuna

    from transferkit.errors import TransferkitError
    from transferkit.sweep import sweep
    from transferkit.sweep.leaderboard import markdown
    from transferkit.sweep.study import HEARTBEAT_SECONDS

    # the sweep prints one line per trial; Optuna's own lines (and failed trials' tracebacks) with --verbose
    optuna.logging.set_verbosity(optuna.logging.INFO if options["verbose"] else optuna.logging.ERROR)
    fixed = command_line_settings(overrides, {key: options.pop(key) for key in FIXED_FLAGS})
    result = sweep(data, _names(backbones), strategies=_names(strategies), fixed=fixed, **options)
    click.echo(markdown(result.leaderboard, result.metric))
    winner = result.winner
    if winner is None:
        running = (f"; trials {', '.join(map(str, result.pending))} are queued or running in other processes (one "
                   "killed on another machine is retried by a sweep started once its heartbeat has stopped for "
                   f"{2 * HEARTBEAT_SECONDS} s)" if result.pending else "")
        raise TransferkitError(f"no trial finished; see the errors in {result.folder / 'leaderboard.csv'}{running}",
                               exit_code=1)
    if result.pending:
        click.echo(f"best so far: trial {winner['trial']} ({winner['backbone']}), {result.metric} "
                   f"{winner[result.metric]:.4f}; trials {', '.join(map(str, result.pending))} are still queued or "
                   "running in other processes: the last process to finish logs the winner's model")
    else:
        click.echo(f"winner: trial {winner['trial']} ({winner['backbone']}), {result.metric} "
                   f"{winner[result.metric]:.4f}, run folder {winner['run_dir']}")
    if result.ensemble is not None:
        ensemble, alone = result.ensemble_scores["ensemble"], result.ensemble_scores["winner"]
        click.echo(f"ensemble: val accuracy {ensemble['accuracy']:.4f} (NLL {ensemble['nll']:.4f}) against the "
                   f"winner's {alone['accuracy']:.4f} (NLL {alone['nll']:.4f}), model folder {result.ensemble}")
    click.echo(f"leaderboard: {result.folder / 'leaderboard.csv'}")
