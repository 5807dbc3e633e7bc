"""Everything MLflow: the tracking store, runs, metrics, models and the Model Registry.

This is the only module that imports `mlflow`. The default store is a SQLite database at
the repository root with artifacts in a repo-root folder; `MLFLOW_TRACKING_URI` (or
`tracking.uri`) points the same code at a team's server.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import random
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from filelock import FileLock

from . import project
from .config import TrackingConfig
from .errors import ModelError, PipelineError

T = TypeVar("T")

CHAMPION = "champion"
LOCK_DIR = ".locks"
# MLflow's dataset digest column holds 36 characters: the first 36 hex digits of the
# SHA-256 (144 bits) go there; the full digest is a tag of the dataset and of the run.
DIGEST_CHARS = 36
# Exact versions the logged model needs to load (fast: no dependency inference).
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")

log = logging.getLogger(__name__)


# --- the store -----------------------------------------------------------------------------

def tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `tracking.uri`, else SQLite at the repository root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{project.root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local `sqlite:///` URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_dir(uri: str, cfg: TrackingConfig) -> Path | None:
    """Artifacts of a local SQLite store go beside it, in `<store folder>/<artifact_dir>`.

    (MLflow's own default is `./mlruns` under the current directory, which inside a queued
    DVC experiment is a temporary copy.) A server decides its own artifact root: None.
    """
    database = sqlite_file(uri)
    return None if database is None else database.resolve().parent / cfg.artifact_dir


def artifact_location(uri: str, cfg: TrackingConfig) -> str | None:
    """`artifact_dir` as the URI an experiment records."""
    folder = artifact_dir(uri, cfg)
    return None if folder is None else folder.as_uri()


def lock(name: str, timeout: float = 600) -> FileLock:
    """A file lock shared by every process working on this repository's store."""
    folder = project.root() / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name}.lock"), timeout=timeout)


def connect(cfg: TrackingConfig) -> str:
    """Point MLflow at the store, create it once (under a lock), return the experiment id.

    Two processes creating a brand-new SQLite store at once crash on `table already
    exists`, so creation is serialised; after that, SQLite handles concurrent writers.
    """
    from mlflow.exceptions import MlflowException

    uri = use_store(cfg)
    artifacts = artifact_location(uri, cfg)
    database = sqlite_file(uri)
    try:
        if database is not None:
            os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
            database.parent.mkdir(parents=True, exist_ok=True)
            with lock("mlflow-store"):
                experiment_id = _get_or_create_experiment(cfg, artifacts)
                _use_wal(database)
            return experiment_id
        return retry(lambda: _get_or_create_experiment(cfg, artifacts))
    except (MlflowException, OSError, sqlite3.Error) as err:
        raise TrackingError(
            f"tracking store {uri} is not usable: {str(err).splitlines()[0][:300]} "
            "(check MLFLOW_TRACKING_URI / tracking.uri, and that the server is up)") from None


def _use_wal(db_path: Path) -> None:
    """Write-ahead logging: readers (the UI) never block writers, writers queue briefly.

    The mode is stored in the database file, so this runs once per store in effect.
    """
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")


def _get_or_create_experiment(cfg: TrackingConfig, artifacts: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(cfg.experiment_name, artifact_location=artifacts)
    except MlflowException:
        # Created by another process between our lookup and create (remote store).
        experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def retry(fn: Callable[[], T], attempts: int = 8, base_delay: float = 0.2) -> T:
    """Retry `fn` on transient store errors ("database is locked", connection resets)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError) as err:
            transient = any(s in str(err).lower() for s in
                            ("database is locked", "busy", "connection", "timed out", "503", "502"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(base_delay * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


# --- runs ----------------------------------------------------------------------------------

class TrackingError(PipelineError):
    """The tracking store cannot be reached or opened."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so the run ends KILLED instead of staying RUNNING."""


@contextlib.contextmanager
def run(experiment_id: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None, resume_run_id: str | None = None) -> Iterator[str]:
    """A run that always ends: FINISHED, FAILED on an exception, KILLED on SIGINT/SIGTERM."""
    import mlflow

    active = retry(lambda: mlflow.start_run(
        run_id=resume_run_id, experiment_id=None if resume_run_id else experiment_id,
        run_name=None if resume_run_id else run_name, tags={**(tags or {}), **owner_tags()},
        parent_run_id=parent_run_id, nested=parent_run_id is not None))
    run_id = active.info.run_id
    try:
        yield run_id
    except KeyboardInterrupt:
        retry(lambda: mlflow.end_run("KILLED"))
        raise
    except BaseException:
        retry(lambda: mlflow.end_run("FAILED"))
        raise
    else:
        retry(lambda: mlflow.end_run("FINISHED"))


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
    running = retry(lambda: client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`process.host` = '{host}'",
        max_results=1000))
    reaped = []
    for stale in running:
        pid = stale.data.tags.get("process.pid", "")
        if not pid.isdigit() or _alive(int(pid)):
            continue
        retry(lambda r=stale: client.set_tag(r.info.run_id, "ended_by", "orphan reaper"))
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


def log_metrics(metrics: Mapping[str, float], step: int | None = None,
                run_id: str | None = None) -> None:
    """Log finite numeric metrics (NaN/inf are skipped: MLflow stores them poorly)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))}
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


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None,
                 run_id: str | None = None) -> None:
    from mlflow import MlflowClient

    target = run_id or _active_run_id()
    retry(lambda: MlflowClient().log_artifact(target, str(path), artifact_path))


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    from mlflow import MlflowClient

    target = run_id or _active_run_id()
    retry(lambda: MlflowClient().log_text(target, text, artifact_file))


def log_dataset(images: np.ndarray, labels: np.ndarray, *, name: str, sha256: str, source: str,
                context: str) -> None:
    """Record the data a run used as an MLflow dataset input keyed by its SHA-256."""
    import mlflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "source can be interpreted in multiple ways"
        dataset = mlflow.data.from_numpy(images, targets=labels, source=source, name=name,
                                         digest=sha256[:DIGEST_CHARS])
    retry(lambda: mlflow.log_input(dataset, context=context, tags={"sha256": sha256}))


def _active_run_id() -> str:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("no active MLflow run: pass run_id or call inside tracking.run()")
    return active.info.run_id


# --- models --------------------------------------------------------------------------------

def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def image_signature():
    """Input: raw uint8 images (N, 28, 28). Output: float32 class probabilities (N, 10)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))


def log_keras_model(model: Any, name: str = "model", tags: Mapping[str, str] | None = None) -> str:
    """Log a Keras model (native .keras) with its signature; return its `models:/` URI."""
    import mlflow

    info = retry(lambda: mlflow.keras.log_model(
        model, name=name, signature=image_signature(), pip_requirements=pinned_requirements(),
        tags=dict(tags or {})))
    return info.model_uri


def load_pyfunc(model_uri: str) -> Any:
    """The model behind `model_uri` through MLflow's generic pyfunc flavour."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise ModelError(f"{model_uri}: {str(err).splitlines()[0]}") from None
    return _PyfuncModel(model)


class _PyfuncModel:
    """A pyfunc model whose prediction errors are `ModelError`s (MLflow's types stay here)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.metadata = model.metadata

    def predict(self, data: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.model.predict(data)
        except MlflowException as err:
            raise ModelError(f"prediction refused: {str(err).splitlines()[0]}") from None


def load_keras(model_uri: str) -> Any:
    import mlflow

    return mlflow.keras.load_model(model_uri)


# --- registry ------------------------------------------------------------------------------

def find_version(name: str, tag: str, value: str) -> Any | None:
    """The registered version of `name` whose tag `tag` equals `value`, if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        versions = retry(lambda: client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(tag) == value:
            return version
    return None


def register(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version of `name` (creating the model if needed)."""
    import mlflow

    return retry(lambda: mlflow.register_model(model_uri, name, tags=dict(tags)))


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        retry(lambda k=key, v=value: client.set_model_version_tag(name, version, k, str(v)))


def champion(name: str) -> Any | None:
    """The version holding the `champion` alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: MlflowClient().get_model_version_by_alias(name, CHAMPION))
    except MlflowException as err:
        if "not found" in str(err).lower() or "RESOURCE_DOES_NOT_EXIST" in str(err) \
                or "does not exist" in str(err).lower():
            return None
        raise


def promote(name: str, version: str) -> None:
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().set_registered_model_alias(name, CHAMPION, version))


def version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def run_info(run_id: str) -> Any:
    from mlflow import MlflowClient

    return retry(lambda: MlflowClient().get_run(run_id))


def silence() -> None:
    """Quiet MLflow's informational chatter on stage output."""
    for name in ("mlflow", "alembic", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)



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
        page = retry(lambda: client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=1000, page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def end_run(run_id: str, status: str) -> None:
    """Set the status of a run whose own process can no longer end it (a killed worker's)."""
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().set_terminated(run_id, status))


# --- serving and UI ---

def use_store(cfg: TrackingConfig) -> str:
    """Point MLflow at the store to read from it (creates nothing); return the store's URI."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return uri
