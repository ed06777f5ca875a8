"""Files shipped with the package: recipes, augmentation presets and sweep files (top-level ``recipes/``).

setup.cfg installs ``recipes/`` as the subpackage ``transferkit.recipes`` and :mod:`importlib.resources` reads it,
so a name such as ``--recipe quick-cpu`` or ``--aug light`` works the same from an editable install, a wheel or a
``pip install --user``.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.errors import TransferkitError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

YAML_SUFFIXES = (".yaml", ".yml")


def bundled_folder(kind: str) -> Traversable:
    """``recipes`` (training recipes), ``recipes/augment`` (presets) or ``recipes/sweeps``: a folder of the
    subpackage ``transferkit.recipes``, which lives outside ``transferkit/`` in the source tree."""
    package, _, folder = kind.partition("/")
    root = files(f"transferkit.{package}")
    return root.joinpath(folder) if folder else root


def bundled_names(kind: str) -> list[str]:
    """The names (file stems) of the YAML files of ``kind``, sorted."""
    return sorted(entry.name.rsplit(".", 1)[0] for entry in bundled_folder(kind).iterdir()
                  if entry.is_file() and entry.name.endswith(YAML_SUFFIXES))


def resolve_yaml(spec: str | os.PathLike, kind: str, what: str) -> Path | Traversable:
    """An existing file ``spec``, else the bundled ``<kind>/<spec>.yaml``; a one-line error naming both otherwise."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    bundled = bundled_folder(kind).joinpath(f"{spec}.yaml")
    if "/" not in str(spec) and os.sep not in str(spec) and bundled.is_file():
        return bundled
    raise TransferkitError(f"{what} {spec!r} is neither a file nor a bundled name ({', '.join(bundled_names(kind))})")
