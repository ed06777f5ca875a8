"""FeatureExtractor: a scikit-learn transformer from images to frozen-backbone vectors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_BACKBONE
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC
from sklearn.utils import estimator_checks

import transferkit
from transferkit.data import discover, load_image
from transferkit.errors import TransferkitError
from transferkit.features.sklearn_api import FeatureExtractor

# The checks about the estimator object itself; the ones that feed numeric 2-D X do not apply (see module doc).
OBJECT_CHECKS = (
    "check_parameters_default_constructible",
    "check_no_attributes_set_in_init",
    "check_get_params_invariance",
    "check_set_params",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_mixin_order",
    "check_valid_tag_types",
    "check_estimator_tags_renamed",
)


@pytest.fixture
def images(tiny_data3):
    index = discover(tiny_data3, val_ratio=0)
    return [str(s.path) for s in index.samples], np.array([s.label for s in index.samples])


@pytest.mark.parametrize("check", OBJECT_CHECKS)
def test_sklearn_object_checks(check, tiny_weights):
    getattr(estimator_checks, check)("FeatureExtractor", FeatureExtractor(TINY_BACKBONE, weights=str(tiny_weights)))


def test_fit_transform_paths_and_arrays(images, tiny_weights):
    paths, _ = images
    extractor = FeatureExtractor(TINY_BACKBONE, weights=str(tiny_weights), batch_size=4)
    with pytest.raises(NotFittedError):
        extractor.transform(paths)
    assert extractor.fit(paths) is extractor
    assert extractor.n_features_out_ == 256 and len(extractor.get_feature_names_out()) == 256
    from_paths = extractor.transform(paths[:5])
    from_arrays = extractor.transform([load_image(p) for p in paths[:5]])
    assert from_paths.shape == (5, 256) and from_paths.dtype == np.float32
    np.testing.assert_allclose(from_paths, from_arrays, rtol=1e-5, atol=1e-6)
    assert extractor.transform([]).shape == (0, 256)
    assert clone(extractor).get_params() == extractor.get_params()
    assert transferkit.FeatureExtractor is FeatureExtractor


def test_inside_pipeline_grid_search_and_cross_val_score(images, tiny_weights):
    paths, labels = images
    pipeline = make_pipeline(FeatureExtractor(TINY_BACKBONE, weights=str(tiny_weights)), LinearSVC())
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    grid = [{"featureextractor__pool": ["avg"], "linearsvc__C": [0.1]},
            {"featureextractor__pool": ["max"], "linearsvc__C": [1.0]}]
    search = GridSearchCV(pipeline, grid, cv=folds)
    search.fit(paths, labels)
    assert search.best_score_ >= 0.9 and set(search.best_params_) == {"linearsvc__C", "featureextractor__pool"}
    scores = cross_val_score(pipeline, np.array(paths), labels, cv=folds)
    assert scores.shape == (3,) and scores.mean() >= 0.9


@pytest.mark.parametrize(("X", "message"), [
    ("one.png", "a list of images"),
    (np.zeros((8, 8, 3), np.uint8), "wrap a single"),
    ([np.zeros((8, 8), np.float32)], "HxWx3 uint8"),
])
def test_bad_images_are_clear_errors(tiny_weights, X, message):
    extractor = FeatureExtractor(TINY_BACKBONE, weights=str(tiny_weights)).fit()
    with pytest.raises(TransferkitError, match=message):
        extractor.transform(X)


def test_bad_parameters_fail_at_fit(tiny_weights):
    with pytest.raises(TransferkitError, match="FeatureExtractor pool 'median'"):
        FeatureExtractor(TINY_BACKBONE, weights=str(tiny_weights), pool="median").fit()
