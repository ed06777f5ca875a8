"""An SVM model's scikit-learn head: the skops file it is kept in, loaded only when it holds trusted types.

The head is stored with skops, never pickle, and loaded with an explicit list of trusted types
(:data:`TRUSTED_TYPES`): a file holding anything else is refused. Fitting and writing heads is
:mod:`transferkit.features.classical_heads`'s job; this module is what predicting with one needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from transferkit.errors import TransferkitError

HEAD_FILE = "head.skops"
# Every scikit-learn type a head pipeline transferkit writes is made of; a file holding any other is refused,
# even one skops trusts by default (a DummyClassifier would answer every image with one class).
TRUSTED_TYPES = [
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
]


def head_probabilities(pipeline, vectors: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, num_classes]`` probabilities, columns in class-index order even if training lacked a class."""
    probs = np.zeros((len(vectors), num_classes), dtype=np.float64)
    probs[:, pipeline.classes_] = pipeline.predict_proba(vectors)
    return probs


def load_head(path: str | os.PathLike, metadata: Mapping | None = None):
    """A head pipeline saved by transferkit, checked against the model's ``metadata`` when given.

    Refused: a file that is not a skops archive; any type outside :data:`TRUSTED_TYPES` and skops' own
    numpy/builtin types (checked on the file's schema before anything is built); a pipeline whose
    classes or input width differ from the class names and feature width in the model's metadata.
    """
    import skops.io

    try:
        outside = (_head_types(path) | set(skops.io.get_untrusted_types(file=path))) - set(TRUSTED_TYPES)
        if outside:
            raise TransferkitError(f"{path} holds types transferkit does not write ({', '.join(sorted(outside))}); "
                                   "refusing to load it: re-create the model with `transferkit svm`")
        head = skops.io.load(path, trusted=TRUSTED_TYPES)
    except TransferkitError:
        raise
    except Exception as exc:  # skops reports damaged archives as whatever zip/json/numpy raised
        raise TransferkitError(f"cannot read SVM head {path} ({type(exc).__name__}: {exc}); the file is damaged "
                               "or not a transferkit head: copy the model folder again") from exc
    if metadata is not None:
        _check_head_fits(head, metadata, path)
    return head


def _head_types(path) -> set[str]:
    """``module.Class`` of every scikit-learn object the skops archive would build, read from its schema."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        schema = json.loads(archive.read("schema.json"))
    found, stack = set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("__module__", "")).startswith("sklearn"):
                found.add(f"{node['__module__']}.{node['__class__']}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _check_head_fits(head, metadata: Mapping, path) -> None:
    classes = [int(c) for c in getattr(head, "classes_", [])]
    width = getattr(head, "n_features_in_", None)
    expected = len(metadata["class_names"])
    if not classes or not set(classes) <= set(range(expected)):
        raise TransferkitError(f"{path} predicts classes {classes}, but the model has {expected} classes "
                               f"({', '.join(metadata['class_names'])}); the head belongs to another model")
    if width != metadata.get("feature_dim"):
        raise TransferkitError(f"{path} takes {width} features, but the backbone gives {metadata.get('feature_dim')}; "
                               "the head belongs to another model")
