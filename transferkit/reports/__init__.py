"""Metrics and figures shared by training, evaluation and tracking."""
