"""User-facing errors: one line that says what is wrong and what to do.

The CLI turns these into ``error: <message>`` and a non-zero exit code; anything else is a bug
and keeps its traceback.
"""


# optional dependencies -> the extra that installs them (setup.cfg [options.extras_require])
EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export", "pytorch_grad_cam": "explain"}


class TransferkitError(Exception):
    """Bad input or environment the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        text = str(message)
        if text.startswith("Caught ") and "\nOriginal Traceback" in text:
            # re-raised by torch's DataLoader from a worker, with the worker's whole traceback as the message:
            # keep the original one-line message (the traceback's last line, less the exception's name)
            text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(" ".join(text.split()))
        if exit_code is not None:
            self.exit_code = exit_code


def missing_extra(exc: ImportError) -> TransferkitError | None:
    """The one-line error for an optional dependency that is not installed; None for any other import error."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    if module not in EXTRAS:
        return None
    return TransferkitError(f"{module} is not installed; this needs pip install 'transferkit[{EXTRAS[module]}]'")


def require_extra(*modules: str) -> None:
    """Import ``modules`` now, failing with :func:`missing_extra`'s line instead of a traceback later."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise (missing_extra(exc) or exc) from exc


def did_you_mean(word: str, names, n: int = 3) -> str:
    """``"; did you mean epochs?"`` for a near-miss among ``names`` (difflib's ratio), else ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(names), n=n, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""
