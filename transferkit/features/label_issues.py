"""Likely label errors and outliers from frozen features, for `data audit`.

Label errors are confident learning (cleanlab's ``find_label_issues``) on out-of-fold probabilities: every
image is scored by a classifier that never saw it, so a wrong label cannot vouch for itself. The classifier
is linear discriminant analysis with Ledoit-Wolf shrinkage on centred, L2-normalised features: on signdigits
with 3 % flipped labels it put 93-100 % of the flips in the first 2x-flipped suspects, against 72-84 % for a
scaled logistic regression, at a fraction of its cost (docs/benchmarks/audit.md).
Outliers are images whose nearest neighbours are all far away (mean cosine distance to the ``k`` nearest,
from the same similarity pass as the near-duplicates), flagged above a robust fence of that distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FOLDS = 5
OUTLIER_FENCE = 5.0  # in robust standard deviations (1.4826 MAD) above the median kNN distance
CLASSIFIER = "LinearDiscriminantAnalysis(shrinkage='auto') on centred L2-normalised features"


@dataclass
class LabelIssues:
    """Suspects ranked most likely first: row indices, suggested labels and cleanlab label-quality scores."""

    ranked: np.ndarray  # row indices of the suspects, worst first
    suggested: np.ndarray  # [N] argmax of the out-of-fold probabilities
    quality: np.ndarray  # [N] cleanlab self-confidence (probability of the given label), low = suspicious
    probabilities: np.ndarray  # [N, C] out-of-fold
    folds: int


def out_of_fold_probabilities(vectors: np.ndarray, labels: np.ndarray, num_classes: int, *,
                              folds: int = DEFAULT_FOLDS, seed: int = 0) -> tuple[np.ndarray, int]:
    """``([N, num_classes] probabilities, folds used)`` from stratified folds, capped by the smallest class.

    One BLAS thread: the matrices are small, and on a busy machine two spinning threads measured 6x slower.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from threadpoolctl import threadpool_limits

    from transferkit.features.neighbours import centred_unit

    present, counts = np.unique(labels, return_counts=True)
    folds = int(min(folds, counts.min()))
    classifier = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with threadpool_limits(1):
        probs = cross_val_predict(classifier, centred_unit(vectors), labels, cv=splitter, method="predict_proba")
    full = np.zeros((len(labels), num_classes), dtype=np.float64)
    full[:, present] = probs  # classes without images keep probability 0
    return full, folds


def find_label_suspects(vectors: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = DEFAULT_FOLDS,
                        seed: int = 0) -> LabelIssues:
    """Rank the images whose given label disagrees with what the rest of the data says about them."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probs, used = out_of_fold_probabilities(vectors, labels, num_classes, folds=folds, seed=seed)
    present = np.unique(labels)
    compact = np.searchsorted(present, labels)  # cleanlab wants labels 0..K-1, each present
    pred_probs = probs[:, present]
    ranked = find_label_issues(compact, pred_probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(compact, pred_probs, method="self_confidence")
    return LabelIssues(np.asarray(ranked, dtype=np.int64), probs.argmax(axis=1), quality, probs, used)


def outlier_scores(neighbour_similarities: np.ndarray) -> np.ndarray:
    """Mean cosine distance to the nearest neighbours: high = unlike anything else in the dataset."""
    return 1.0 - neighbour_similarities.mean(axis=1)


def outlier_cutoff(scores: np.ndarray, fence: float = OUTLIER_FENCE) -> float:
    """Median + ``fence`` robust standard deviations: a rare, clear departure, not the tail of every dataset."""
    median = float(np.median(scores))
    spread = 1.4826 * float(np.median(np.abs(scores - median)))
    return median + fence * max(spread, 1e-6)
