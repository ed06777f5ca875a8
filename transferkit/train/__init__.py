"""Fine-tuning: :func:`finetune` trains a timm backbone with a new head into a run folder; :func:`find_lr` runs
the LR range test on the same setup.

The engine (torch, timm) is imported on first use, so ``transferkit.train.config`` — which the CLI reads to
build its flags — stays cheap to import.
"""

__all__ = ["RunResult", "find_lr", "finetune"]


def __getattr__(name):
    if name in __all__:
        from transferkit.train import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
