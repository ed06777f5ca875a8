"""Find the best model for a dataset: rank backbones cheaply, finetune the best, compare it all in MLflow.

:func:`sweep` runs two stages. Stage 1 (:mod:`.ranking`) ranks every backbone by a cross-validated linear
probe on its frozen features; stage 2 (:mod:`.study`) finetunes the top-k with the searched keys
(:mod:`.space`) as an Optuna study — a grid, or ``trials`` TPE trials — that several processes can share.
With tracking on, the sweep is one MLflow parent run with every trial a nested child run; the parent holds the
ranking, the leaderboard (:mod:`.leaderboard`), the winner's run id and the winner's model.
"""

__all__ = ["SweepResult", "sweep"]


def __getattr__(name: str):
    """The runner (pandas, optuna) loads on first use: the CLI reads :mod:`.space`'s key lists at import time."""
    if name in __all__:
        from transferkit.sweep import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
