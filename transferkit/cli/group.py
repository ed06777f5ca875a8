"""The `transferkit` click group every command module registers on, and how it reports user errors."""

from __future__ import annotations

import os
import signal
import threading

import click
import cloup

from transferkit.errors import TransferkitError, missing_extra
from transferkit.version import __version__

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # keep a command's output to what it did
INTERRUPTED = 130  # the shell's code for a command stopped by a signal (128 + SIGINT)


class TransferkitGroup(click.Group):
    """Turns :class:`TransferkitError` (and a missing optional extra) into ``error: ...`` and its exit code.

    Its commands are cloup's, whose ``--help`` shows option groups (finetune: Data, Model, Training, ...)."""

    command_class = cloup.Command

    def invoke(self, ctx):
        _stop_on_sigterm()
        try:
            return super().invoke(ctx)
        except TransferkitError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except ImportError as exc:  # an optional extra that is not installed: say which, not a traceback
            error = missing_extra(exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C: temp files go, the MLflow run is marked KILLED."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@click.group(cls=TransferkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="transferkit")
def main():
    """Transfer learning for image folders: finetune a timm backbone, or SVM on its frozen features,
    every run tracked in MLflow."""

