"""What values each setting takes, declared once and read by the config, the CLI flags and the Python API.

After scikit-learn's ``_parameter_constraints``: a constraint (an :class:`Interval` of numbers, one of some
:class:`Options`, ``.allowing(None)`` where a setting may be unset) checks a value, coerces YAML/CLI text to its
type, makes the click type of a flag and names itself for ``--help``. However a value arrives, a bad one gets the
same one line: ``bad value for KEY: VALUE; it must be DESCRIPTION`` (``unknown KEY 'VALUE'; use one of A, B``
for a name that is not one of the options). Pure Python (no torch), so the CLI imports it for free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import click

from transferkit import choices
from transferkit.errors import TransferkitError


class Constraint:
    """The values a setting takes; subclasses say which (``_coerce``, ``_accepts``) and how to name them."""

    description = "any value"  # completes "it must be ..."
    metavar = "VALUE"  # the flag's placeholder in --help

    def check(self, key: str, value: Any) -> Any:
        """``value`` as the declared type, or the one-line error naming ``key``."""
        try:
            coerced = self._coerce(value)
        except _NotFinite:
            raise TransferkitError(bad_value(key, value, "it must be a finite number")) from None
        except (TypeError, ValueError):
            raise self.error(key, value) from None
        if not self._accepts(coerced):
            raise self.error(key, coerced)
        return coerced

    def error(self, key: str, value: Any) -> TransferkitError:
        return self._refusal(key, value, self.description)

    def _refusal(self, key: str, value: Any, description: str) -> TransferkitError:
        return TransferkitError(bad_value(key, value, f"it must be {description}"))

    def allowing(self, *literals) -> Constraint:
        """This constraint, or exactly one of ``literals`` (``None``: unset, ``"auto"``: chosen at run time)."""
        return WithLiterals(self, literals)

    def click_type(self) -> click.ParamType:
        """A click type whose failure is this constraint's own one-line error (``error: ...``, exit code 2)."""
        return ConstraintType(self)

    def _coerce(self, value):
        return value

    def _accepts(self, value) -> bool:
        return True


class Interval(Constraint):
    """Numbers of ``type`` (int or float) between ``low`` and ``high`` (None: unbounded), as in scikit-learn.

    ``closed`` says which bounds belong to the interval: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.
    """

    def __init__(self, type: type, low: float | None, high: float | None, *, closed: str = "both"):
        if type not in (int, float) or closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Interval({type!r}, closed={closed!r}): type is int or float, closed both/left/right/neither")
        self.type, self.low, self.high, self.closed = type, low, high, closed

    @property
    def description(self) -> str:
        """``an int >= 1``, ``> 0``, ``in [0, 1)``: an int setting says so, since 2.5 is its likely mistake."""
        if self.low is None and self.high is None:
            return "an int" if self.type is int else "a number"
        if self.high is None:
            bound = f"{'>=' if self._low_closed else '>'} {self.low:g}"
        elif self.low is None:
            bound = f"{'<=' if self._high_closed else '<'} {self.high:g}"
        else:
            bound = f"in {'[' if self._low_closed else '('}{self.low:g}, {self.high:g}{']' if self._high_closed else ')'}"
        return f"an int {bound}" if self.type is int else bound

    @property
    def metavar(self) -> str:
        return "INT" if self.type is int else "FLOAT"

    def _coerce(self, value):
        """Numbers and numeric text; an int setting takes 2.0 but not 2.5; true/false are not numbers."""
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise _NotFinite
        if self.type is int:
            if number != int(number):
                raise ValueError
            return int(number)
        return number

    def _accepts(self, value) -> bool:
        above = self.low is None or value > self.low or (self._low_closed and value == self.low)
        below = self.high is None or value < self.high or (self._high_closed and value == self.high)
        return above and below

    @property
    def _low_closed(self) -> bool:
        return self.closed in ("both", "left")

    @property
    def _high_closed(self) -> bool:
        return self.closed in ("both", "right")


class Options(Constraint):
    """One of a fixed tuple of names (those of :mod:`transferkit.choices`)."""

    def __init__(self, values: Iterable[str]):
        self.values = tuple(values)
        self.description = f"one of {', '.join(self.values)}"
        self.metavar = "[" + "|".join(self.values) + "]"

    def _refusal(self, key: str, value, description: str) -> TransferkitError:
        return TransferkitError(f"unknown {key} {value!r}; use one of {', '.join(self.values)}")

    def click_type(self) -> click.ParamType:
        return OptionsType(self)

    def _accepts(self, value) -> bool:
        return value in self.values


class Text(Constraint):
    """Any string (a name, a path, a URI); YAML's mappings, lists and booleans are not text."""

    description = "a string"
    metavar = "TEXT"

    def _coerce(self, value):
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ValueError
        return str(value)


class Boolean(Constraint):
    """true or false, as YAML writes them (the CLI's ``--key/--no-key`` flags give them too)."""

    description = "true or false"
    metavar = "BOOLEAN"

    def _coerce(self, value):
        if not isinstance(value, bool):
            raise ValueError
        return value


class WithLiterals(Constraint):
    """A constraint, or one of a few literal values taken as they are (``None``, ``"auto"``)."""

    def __init__(self, base: Constraint, literals: Iterable):
        self.base, self.literals = base, tuple(literals)
        named = ["null" if literal is None else str(literal) for literal in self.literals]
        self.description = " or ".join([self.base.description, *named])
        self.metavar = "|".join([self.base.metavar, *(name for name in named if name != "null")])

    def check(self, key: str, value):
        if any(value is literal or (literal is not None and value == literal) for literal in self.literals):
            return value
        return super().check(key, value)

    def allowing(self, *literals) -> Constraint:
        return WithLiterals(self.base, self.literals + tuple(lit for lit in literals if lit not in self.literals))

    def _refusal(self, key: str, value, description: str) -> TransferkitError:
        return self.base._refusal(key, value, description)

    def _coerce(self, value):
        return self.base._coerce(value)

    def _accepts(self, value) -> bool:
        return self.base._accepts(value)

    def click_type(self) -> click.ParamType:
        return self.base.click_type() if self.literals == (None,) else ConstraintType(self)


class ConstraintType(click.ParamType):
    """A flag checked by its constraint, so the CLI says exactly what the config and the API say."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.name = constraint.metavar

    def get_metavar(self, param, ctx=None) -> str:
        return self.constraint.metavar

    def convert(self, value, param, ctx):
        return self.constraint.check(param.name if param is not None else "value", value)


class OptionsType(click.Choice):
    """click.Choice (its --help list and shell completion) whose refusal is the constraint's one-line error."""

    def __init__(self, constraint: Options):
        super().__init__(constraint.values)
        self.constraint = constraint

    def convert(self, value, param, ctx):
        return self.constraint.check(param.name if param is not None else "value", value)


def bad_value(key: str, value, hint: str) -> str:
    """The one line every refused value gets."""
    return f"bad value for {key}: {value!r}; {hint}"


def check_params(owner: str, constraints: dict[str, Constraint], values: dict[str, Any]) -> dict[str, Any]:
    """Check (and coerce) each of ``values`` against its constraint, naming ``owner`` (scikit-learn style)."""
    return {name: constraints[name].check(f"{owner} {name}".strip(), value) for name, value in values.items()}


class _NotFinite(ValueError):
    """A number that is nan or infinite: named as such, whatever the setting's range."""


# --------------------------------------------------------------------------- settings shared by several commands

BATCH_SIZE = Interval(int, 1, None)
WORKERS = Interval(int, 0, None)
IMG_SIZE = Interval(int, 16, None)  # smaller leaves a CNN's last stage without pixels
SEED = Interval(int, 0, None)
VAL_RATIO = Interval(float, 0, 1, closed="left")
EPOCHS = Interval(int, 1, None)
TOPK = Interval(int, 1, None)
CV_FOLDS = Interval(int, 2, None)
SIMILARITY_THRESHOLD = Interval(float, 0, 1, closed="right")
PREVIEW_SAMPLES = Interval(int, 1, 256)
CALIBRATION_IMAGES = Interval(int, 1, None)
MAX_DROP = Interval(float, 0, None)  # accuracy points
TRIALS = Interval(int, 1, None)
DENSE_SHORT_SIDE = Interval(int, 32, 2048)  # pixels of a dense frame's short side (issue 24: bounded)
MAX_UPLOAD_MB = Interval(float, 0, 1024, closed="right")  # serve; issue 24: bounded (inf, 1e308 overflowed)
PORT = Interval(int, 0, 65535)  # 0: any free port
# None: the backbone's own crop mode (timm's crop_mode; crop for most)
RESIZE_MODE = Options(choices.RESIZE_MODES).allowing(None)
TTA = Options(choices.TTA_MODES)
CACHE_MODE = Options(choices.CACHE_MODES)
INTERPOLATION = Options(choices.INTERPOLATIONS)
FEATURE_TTA = Options(choices.FEATURE_TTA_MODES)
POOL = Options(choices.POOLS)
FEATURE_DTYPE = Options(choices.FEATURE_DTYPES)
FEATURE_SPLIT = Options(choices.FEATURE_SPLITS)
HEAD_MODEL = Options(choices.HEAD_MODELS)
MONITOR = Options(choices.MONITORS)
EXPORT_FORMAT = Options(choices.EXPORT_FORMATS)
EXPORT_PRECISION = Options(choices.EXPORT_PRECISIONS)
CALIBRATION_METHOD = Options(choices.CALIBRATION_METHODS)
CAM_METHOD = Options(choices.CAM_METHODS)

# --- issue 24: export/calibration/audit ---
ONNX_OPSET = Interval(int, 7, None)  # torch exports opset 7 and later; the newest is the installed onnx's (checked there)

# --- issue 24: sweep ---


class FolderName(Text):
    """One folder's name, never a path: what it names stays inside its parent folder (a study in --out)."""

    description = "a single folder name, without / or \\ (its folder goes in --out)"

    def _accepts(self, value) -> bool:
        return bool(value.strip()) and value not in (".", "..") and not set(value) & set("/\\\0")


STUDY_NAME = FolderName()

# --- combining models (issue 29) ---
ENSEMBLE_SELECTION = Options(choices.ENSEMBLE_SELECTIONS)
ENSEMBLE_ROUNDS = Interval(int, 1, None)
SOUP_RECIPE = Options(choices.SOUP_RECIPES)

# --- sweep --ensemble (issue 25/29) ---
SWEEP_ENSEMBLE = Interval(int, 2, None)  # the best K trials' models averaged: at least two
