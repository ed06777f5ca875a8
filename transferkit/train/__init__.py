"""Fine-tuning: :func:`finetune` trains a timm backbone with a new head into a run folder."""

from transferkit.train.engine import RunResult, finetune

__all__ = ["RunResult", "finetune"]
