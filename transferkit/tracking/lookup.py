"""Finding the run that logged a model, by the checkpoint's digest, wherever the file was copied to."""

from __future__ import annotations

import os

from transferkit.tracking.store import check_reachable, resolve_tracking_uri, sqlite_path

MODEL_DIGEST_TAG = "model_sha256"


def model_digest(checkpoint: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file (``find_checkpoint`` resolves folders): the model's identity across copies."""
    from transferkit.core.fileio import sha256_file
    from transferkit.models.saved_model import find_checkpoint

    return sha256_file(find_checkpoint(checkpoint))


def find_model_run(digest: str, tracking_uri: str | None = None):
    """The latest MLflow run (``mlflow.entities.Run``) in the store that logged the model whose checkpoint has
    digest ``digest`` (see :meth:`transferkit.tracking.tracker.Tracker.log_model`), or None."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    if sqlite_path(uri) is not None and not sqlite_path(uri).exists():
        return None  # no store yet: nothing to find, and MLflow would create one just to look
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.{MODEL_DIGEST_TAG} = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def best_first_links(store: str, url: str, limit: int) -> list[tuple[str, str]]:
    """``(experiment name, "best first" link)`` for up to ``limit`` experiments of a store that have runs, most
    recently active first."""
    if sqlite_path(store) is not None and not sqlite_path(store).exists():
        return []  # no store yet: MLflow would create one just to look
    from mlflow import MlflowClient

    from transferkit.tasks import get_task
    from transferkit.tracking.summary import BEST_VIEW_TAG, view_link

    client = MlflowClient(store)
    headline = get_task().headline
    links = []
    for experiment in client.search_experiments(order_by=["last_update_time DESC"], max_results=50):
        if client.search_runs([experiment.experiment_id], max_results=1):
            links.append((experiment.name, view_link(url, experiment.experiment_id, BEST_VIEW_TAG in experiment.tags,
                                                     headline)))
        if len(links) == limit:
            break
    return links
