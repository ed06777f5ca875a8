"""User-facing errors: one line that says what is wrong and what to do.

The CLI turns these into ``error: <message>`` and a non-zero exit code; anything else is a bug
and keeps its traceback.
"""


class TransferkitError(Exception):
    """Bad input or environment the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code
