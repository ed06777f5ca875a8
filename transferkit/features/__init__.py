"""Frozen-backbone features, the classical heads fitted on them, a scikit-learn transformer, and the
dataset audit (label errors, near-duplicates, outliers) built on them."""
