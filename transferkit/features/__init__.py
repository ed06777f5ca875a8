"""Frozen-backbone features, the classical heads fitted on them, and a scikit-learn transformer."""
