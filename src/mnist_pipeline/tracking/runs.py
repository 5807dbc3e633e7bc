"""MLflow runs: a run that always ends, params, metrics, tags, artifacts and datasets, and the
reaping of runs whose process was killed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import TrackingError
from . import lineage
from .store import current_uri, retry

# MLflow's own tag for the commit (`mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT`); the runs
# table of the UI shows it as "Version".
GIT_COMMIT = "mlflow.source.git.commit"

# MLflow's dataset digest column holds 36 characters: the first 36 hex digits of the
# SHA-256 (144 bits) go there; the full digest is a tag of the dataset and of the run.
DIGEST_CHARS = 36


@contextlib.contextmanager
def run(
    experiment_id: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """A run that always ends: FINISHED, FAILED on an exception, KILLED on SIGINT/SIGTERM."""
    import mlflow

    active = retry(
        lambda: mlflow.start_run(
            run_id=resume_run_id,
            experiment_id=None if resume_run_id else experiment_id,
            run_name=None if resume_run_id else run_name,
            tags={**(tags or {}), **owner_tags()},
            parent_run_id=parent_run_id,
            nested=parent_run_id is not None,
        )
    )
    run_id = active.info.run_id
    try:
        if GIT_COMMIT not in active.data.tags:
            _record_commit(run_id)
        yield run_id
    except KeyboardInterrupt:
        _end_after_failure(mlflow, "KILLED")
        raise
    except BaseException:
        _end_after_failure(mlflow, "FAILED")
        raise
    else:
        retry(lambda: mlflow.end_run("FINISHED"))


# Ending a run that failed must not hide why it failed: a store that is away gets this long,
# then the run is left to the orphan reaper (`reap_orphans`) and the original error stands.
END_AFTER_FAILURE_S = 10.0


def _end_after_failure(mlflow: Any, status: str) -> None:
    try:
        retry(lambda: mlflow.end_run(status), within_s=END_AFTER_FAILURE_S)
    except TrackingError:
        pass


def create(experiment_id: str, *, run_name: str, tags: Mapping[str, str]) -> str:
    """A new run, RUNNING but not started in this process (`run(resume_run_id=...)` does)."""
    from mlflow import MlflowClient

    created = retry(
        lambda: MlflowClient().create_run(
            experiment_id, run_name=run_name, tags={**tags, **owner_tags()}
        )
    )
    return created.info.run_id


def _record_commit(run_id: str) -> None:
    """The commit checked out in the working directory, under MLflow's tag, where MLflow set
    none.

    MLflow tags the commit of the repository that holds the entry point (`sys.argv[0]`):
    a stage script under `dvc repro` or in a queued `dvc exp run`'s copy of the repository,
    and sweep workers (spawned processes keep their parent's argv). It finds none where the
    entry point is no tracked file (pytest from a virtual environment, `python -c`, a
    notebook): the project that trains is then the working directory, and outside a git
    repository (the test stores in temporary folders) no commit is recorded.
    """
    commit = lineage.git_commit()
    if commit is not None:
        set_tags({GIT_COMMIT: commit}, run_id=run_id)


def owner_tags() -> dict[str, str]:
    """Which process owns a run, so a run whose process was SIGKILLed can be reaped."""
    return {"process.host": socket.gethostname(), "process.pid": str(os.getpid())}


def reap_orphans(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs of this host whose process no longer exists.

    SIGKILL (or a power cut) cannot be caught, so such a run would stay RUNNING forever;
    the next training job on the same host closes it. Returns the run ids it ended.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    running = retry(
        lambda: client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
            max_results=1000,
        )
    )
    reaped = []
    for stale in running:
        pid = stale.data.tags.get("process.pid", "")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        retry(functools.partial(client.set_tag, stale.info.run_id, "ended_by", "orphan reaper"))
        end_run(stale.info.run_id, "KILLED")
        reaped.append(stale.info.run_id)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_run_status(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.status


def log_params(params: Mapping[str, Any]) -> None:
    import mlflow

    clean = {k: ("null" if v is None else v) for k, v in params.items()}
    retry(lambda: mlflow.log_params(clean))


def log_metrics(
    metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None
) -> None:
    """Log finite numeric metrics (NaN/inf are skipped: MLflow stores them poorly)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    clean = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))
    }
    if not clean:
        return
    target = run_id or _active_run_id()
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step or 0) for key, value in clean.items()]
    retry(lambda: MlflowClient().log_batch(target, metrics=batch))


def set_tags(tags: Mapping[str, Any], run_id: str | None = None) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    target = run_id or _active_run_id()
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    retry(lambda: MlflowClient().log_batch(target, tags=batch))


def log_artifact(
    path: str | os.PathLike[str], artifact_path: str | None = None, run_id: str | None = None
) -> None:
    from mlflow import MlflowClient

    target = run_id or _active_run_id()
    retry(lambda: MlflowClient().log_artifact(target, str(path), artifact_path))


def download_artifact(run_id: str, artifact_path: str, dst: str | os.PathLike[str]) -> str | None:
    """Artifact `artifact_path` of run `run_id` downloaded into `dst`; None when the run has
    no such artifact (or no longer exists)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return retry(
            lambda: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)
            )
        )
    except (MlflowException, OSError):
        return None


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    from mlflow import MlflowClient

    target = run_id or _active_run_id()
    retry(lambda: MlflowClient().log_text(target, text, artifact_file))


def log_dataset(
    images: np.ndarray, labels: np.ndarray, *, name: str, sha256: str, source: str, context: str
) -> None:
    """Record the data a run used as an MLflow dataset input keyed by its SHA-256."""
    import mlflow
    from mlflow.data.numpy_dataset import from_numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways"
        dataset = from_numpy(
            images, targets=labels, source=source, name=name, digest=sha256[:DIGEST_CHARS]
        )
    retry(lambda: mlflow.log_input(dataset, context=context, tags={"sha256": sha256}))


def _active_run_id() -> str:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no active MLflow run: pass run_id or call inside tracking.run()")
    return active.info.run_id


def run_info(run_id: str, *, named_in: str | None = None) -> Any:
    """The run `run_id`. `named_in`: the file that named it; a run the store does not have
    is then one clear error (outputs restored from a DVC cache that another store filled)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: MlflowClient().get_run(run_id))
    except MlflowException as err:
        if named_in is None or getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise TrackingError(
            f"{named_in}: run {run_id} is not in the tracking store {current_uri()}; the train "
            "outputs were logged to another store (restored from a DVC cache or pulled), or "
            "the run was deleted: point MLFLOW_TRACKING_URI at that store, or train again here "
            "(`dvc repro -f train`, `dvc exp run -f`)"
        ) from None


# --- sweeps --------------------------------------------------------------------------------


def log_figure(figure: Any, artifact_file: str, run_id: str) -> None:
    """A matplotlib figure as a PNG artifact of `run_id`."""
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().log_figure(run_id, figure, artifact_file))


def live_run_exists(run_id: str) -> bool:
    """Whether `run_id` is in the store and not deleted."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = retry(lambda: MlflowClient().get_run(run_id))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def child_runs(parent_run_id: str) -> list[Any]:
    """Every run nested under `parent_run_id` (tag `mlflow.parentRunId`), all pages."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = retry(lambda: client.get_run(parent_run_id)).info.experiment_id
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = retry(
            functools.partial(
                client.search_runs,
                [experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                max_results=1000,
                page_token=token,
            )
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_run(run_id: str, status: str) -> None:
    """Set the status of a run whose own process can no longer end it (a killed worker's)."""
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().set_terminated(run_id, status))
