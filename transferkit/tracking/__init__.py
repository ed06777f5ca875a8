"""MLflow: runs, their metrics and artifacts, and the MLflow model flavour."""
