"""The classical heads' grid search: folds in parallel, each grid point fitted once per fold, fast fits in the search
and the estimator's own tolerance in the final fit, ties to the smallest C."""

from __future__ import annotations

import numpy as np
import pytest


def _separable_table(n_per_class=20, classes=3, dim=8):
    from transferkit.features.feature_file import FeatureTable

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), n_per_class)
    vectors = (rng.normal(size=(len(labels), dim)) + labels[:, None] * 0.8).astype(np.float32)
    return FeatureTable(np.array([f"{i}.png" for i in range(len(labels))]), labels.astype(str), labels,
                        np.array(["train"] * len(labels)), vectors), {"class_names": [str(c) for c in range(classes)]}


def test_svm_search_runs_folds_in_parallel_fits_each_point_once_and_shows_a_bar(monkeypatch, capsys):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    from transferkit.features.classical_heads import fit_head

    fits = []
    original = LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, *a, **k: fits.append(self.C) or original(self, *a, **k))
    features = _separable_table()
    serial = fit_head(features, "logistic", cv=3, n_jobs=1, progress=False)
    assert len(fits) == 4 * 3 + 1  # every grid point once per fold, then one fit on all train rows
    parallel = fit_head(features, "logistic", cv=3, n_jobs=2, progress=True)
    assert "grid search" in capsys.readouterr().err  # the bar, when asked for (by default: on a terminal)
    assert parallel.best_params == serial.best_params and parallel.cv_accuracy == serial.cv_accuracy
    table = features[0]  # the same choice as scikit-learn's own search on the standardised vectors
    search = GridSearchCV(LogisticRegression(max_iter=5000), {"C": [0.01, 0.1, 1.0, 10.0]},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0))
    search.fit(StandardScaler().fit_transform(table.vectors), table.label_index)
    assert serial.best_params == search.best_params_
    assert serial.cv_accuracy == pytest.approx(search.best_score_, abs=0.02)  # warm starts: same optimum, tol apart


def test_svm_search_fits_stop_early_the_final_fit_does_not_and_ties_go_to_the_smallest_c(monkeypatch):
    from sklearn.svm import LinearSVC

    from transferkit.features.classical_heads import SEARCH_TOL, fit_head

    fits = []
    original = LinearSVC.fit
    monkeypatch.setattr(LinearSVC, "fit", lambda self, *a, **k: fits.append((self.C, self.tol)) or original(self, *a, **k))
    features = _separable_table(classes=2)
    features[0].vectors[:, 0] += features[0].label_index * 100.0  # every C separates the classes: an exact tie
    result = fit_head(features, "linear-svm", cv=3, grid={"C": [10, 0.1, 1]}, n_jobs=1, progress=False)
    assert result.best_params == {"C": 0.1} and result.cv_accuracy == 1.0
    search, final = fits[:9], fits[9:]  # 3 folds x 3 values; then Platt scaling's folds and the fit on all rows
    assert {tol for _, tol in search} == {SEARCH_TOL}
    assert final and {c for c, _ in final} == {0.1} and {tol for _, tol in final} == {LinearSVC().tol}
    fits.clear()
    fit_head(features, "linear-svm", cv=3, grid={"C": [1], "tol": [0.1]}, n_jobs=1, progress=False)
    assert {tol for _, tol in fits} == {0.1}  # a tol in the grid is the user's: it wins in the search and after
