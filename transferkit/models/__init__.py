"""Backbones with their preprocessing, the saved-model format and the predictors built from it."""
