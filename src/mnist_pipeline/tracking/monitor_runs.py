"""The monitor's MLflow side: the served version's reference, and one run per checked window in
the `monitoring` experiment (so the UI charts the estimates and p-values over time).

The reference is what the evaluate stage logged on the version's run
(`monitoring/reference.npz`: the model's calibrated outputs on the clean test set, with the
input statistics and which answers were right). A window already logged (same model,
version and log ids: tag `monitor.window`) is not logged again, so running the monitor from
cron every few minutes adds one run per new window.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import TrackingError
from . import registry, runs
from .store import retry

REFERENCE_ARTIFACT = "monitoring/reference.npz"
WINDOW_TAG = "monitor.window"
MAX_WINDOW_RUNS = 50_000  # per version: ~7 months of one window every 5 minutes


def download_reference(name: str, version: str, dst: str | os.PathLike[str]) -> Path:
    """Version `version` of `name`'s reference, downloaded into `dst`."""
    found = registry.version(name, version)
    if found is None:
        raise TrackingError(
            f"the request log names version {version} of {name!r}, which the "
            "registry does not have: is MLFLOW_TRACKING_URI / tracking.uri "
            "the store the server was started from?"
        )
    path = runs.download_artifact(found.run_id, REFERENCE_ARTIFACT, dst)
    if path is None:
        raise TrackingError(
            f"version {version} of {name!r} (run {found.run_id}) has no "
            f"{REFERENCE_ARTIFACT}: it was evaluated before references were "
            "recorded; evaluate it again (dvc repro -f evaluate in its "
            "workspace) or monitor a newer version"
        )
    return Path(path)


def logged_windows(experiment_id: str, keys: Iterable[str]) -> set[str]:
    """Which of `keys` already have a run."""
    import mlflow

    wanted = set(keys)
    if not wanted:
        return set()
    found: set[str] = set()
    # MLflow's filter has no IN for tags: one search per version the keys name.
    for prefix in sorted({key.rsplit("/", 1)[0] for key in wanted}):
        # `_` and `%` in a name match more than themselves: harmless, the keys are compared.
        escaped = prefix.replace("'", "\\'")
        runs_found = retry(
            functools.partial(
                mlflow.search_runs,
                experiment_ids=[experiment_id],
                filter_string=f"tags.`{WINDOW_TAG}` LIKE '{escaped}/%'",
                output_format="list",
                max_results=MAX_WINDOW_RUNS,
            )
        )
        found |= {run.data.tags.get(WINDOW_TAG, "") for run in runs_found}
    return found & wanted


def log_window(
    experiment_id: str,
    key: str,
    *,
    name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    timestamp_ms: int,
    report: dict[str, Any],
) -> str:
    """One run for one window: its figures as metrics stamped with the window's last answer,
    the full result as `window.json`."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    with runs.run(experiment_id, run_name=name, tags={WINDOW_TAG: key, **tags}) as run_id:
        batch = [Metric(k, float(v), timestamp_ms, 0) for k, v in metrics.items()]
        retry(lambda: client.log_batch(run_id, metrics=batch))
        runs.log_text(_json(report), "window.json", run_id=run_id)
    return run_id


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=float)
