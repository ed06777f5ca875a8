"""The `transferkit` command: a thin click layer over the Python API.

Each command module registers itself on :data:`transferkit.cli.group.main`; heavy imports (torch, timm,
mlflow) happen inside the commands so `transferkit --help` stays fast. Every user error is one line and a
non-zero exit code.
"""

from transferkit.cli import augment, backbones, combine, data, features, finetune, sweep, ui, use  # noqa: F401  (command registration)
from transferkit.cli.group import main

__all__ = ["main"]
