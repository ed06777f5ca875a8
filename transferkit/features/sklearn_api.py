"""A scikit-learn transformer that turns images into frozen-backbone feature vectors.

    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.svm import LinearSVC
    >>> clf = make_pipeline(FeatureExtractor("tf_efficientnet_lite0", weights="lite0.safetensors"), LinearSVC())
    >>> clf.fit(train_paths, train_labels).score(val_paths, val_labels)

Inside ``GridSearchCV`` every fold re-extracts its images; pass ``Pipeline(..., memory=DIR)`` to cache the
fitted extractor, or extract once with :func:`transferkit.features.extract.extract_features` for large searches.

scikit-learn conformance (``sklearn.utils.estimator_checks``; tested in ``tests/test_sklearn_api.py``):
the checks about the estimator object pass — ``check_parameters_default_constructible``,
``check_no_attributes_set_in_init``, ``check_get_params_invariance``, ``check_set_params``,
``check_estimator_cloneable``, ``check_estimator_repr``, ``check_do_not_raise_errors_in_init_or_set_params``,
``check_mixin_order``, ``check_valid_tag_types``, ``check_estimator_tags_renamed`` — plus the fit-returns-self,
unfitted-transform (NotFittedError) and clone-inside-a-search behaviour. The checks that feed random
numeric 2-D arrays (dtypes, NaN/inf, sparse input, ``n_features_in_``, 1-D / 1-feature / 1-sample fits,
pandas/polars output, subset/order invariance on numeric data) do not apply: ``X`` here is a sequence of
images (paths or ``HxWx3`` uint8 arrays), not a numeric matrix, so there are no input "features" to count
and ``n_features_in_`` is not set (sklearn's rule for non-tabular inputs such as text vectorizers). The
output width is ``n_features_out_``, with names from ``get_feature_names_out``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from transferkit import params
from transferkit.errors import TransferkitError


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Images (paths or uint8 ``HxWx3`` arrays) → ``[N, D]`` float32 vectors of a frozen timm backbone.

    ``fit`` only loads the backbone (the features are not learned), so it is cheap and ignores ``y``.
    Parameters are those of ``transferkit extract``.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights=None, weights_config=None,
                 pretrained: bool = True, pool: str = "avg", layer=None, tta: str = "none", batch_size: int = 32,
                 resize_mode: str | None = None, device: str = "cpu", amp: bool = True):
        self.backbone = backbone
        self.weights = weights
        self.weights_config = weights_config
        self.pretrained = pretrained
        self.pool = pool
        self.layer = layer
        self.tta = tta
        self.batch_size = batch_size
        self.resize_mode = resize_mode
        self.device = device
        self.amp = amp

    _parameter_constraints = {"pool": params.POOL, "tta": params.FEATURE_TTA, "batch_size": params.BATCH_SIZE,
                              "resize_mode": params.RESIZE_MODE, "pretrained": params.Boolean(),
                              "amp": params.Boolean()}

    def fit(self, X=None, y=None):
        from transferkit.core.runtime import prepare_model, select_device
        from transferkit.models.embedding import build_feature_model, check_pool, feature_dim, resolve_layer

        self._check_params()
        self.device_ = select_device(self.device)
        model, self.preprocessing_ = build_feature_model(
            self.backbone, weights=self.weights, weights_config=self.weights_config, pretrained=self.pretrained,
            resize_mode=self.resize_mode,
        )
        self.layer_index_ = resolve_layer(model, self.layer)
        check_pool(model, self.pool, self.layer_index_)
        self.model_ = prepare_model(model, self.device_).eval()
        self.n_features_out_ = feature_dim(self.model_, self.pool, self.layer_index_, self.tta)
        return self

    def transform(self, X) -> np.ndarray:
        from transferkit.features.extract import iter_features

        check_is_fitted(self, "model_")
        images = _as_image_list(X)
        chunks = [vectors for vectors, _ in iter_features(
            self.model_, self._batches(images), self.device_, amp=self.amp, pool=self.pool,
            layer=self.layer_index_, tta=self.tta,
        )]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.n_features_out_), np.float32)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.array([f"feature{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True  # image paths
        tags.transformer_tags.preserves_dtype = []
        tags.requires_fit = True
        return tags

    def _batches(self, images: list) -> Iterator[tuple]:
        for batch in self.preprocessing_.batches(images, int(self.batch_size)):
            yield batch, np.full(len(batch), -1)

    def _check_params(self) -> None:
        """scikit-learn's rule: parameters are checked in fit, never in __init__ or set_params."""
        values = {name: getattr(self, name) for name in self._parameter_constraints}
        params.check_params("FeatureExtractor", self._parameter_constraints, values)


def _as_image_list(X) -> list:
    """A list of paths / HxWx3 arrays; a 4-D uint8 array is a stack of images."""
    if isinstance(X, (str, os.PathLike)):
        raise TransferkitError("FeatureExtractor.transform takes a list of images, not a single path")
    if isinstance(X, np.ndarray) and X.ndim == 3 and X.shape[-1] == 3 and X.dtype == np.uint8:
        raise TransferkitError("FeatureExtractor.transform takes a list of images; wrap a single HxWx3 array in a list")
    return list(X)

