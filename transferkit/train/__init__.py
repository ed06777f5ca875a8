"""Fine-tuning: :func:`finetune` trains a timm backbone with a new head into a run folder."""

from .engine import RunResult, finetune

__all__ = ["RunResult", "finetune"]
