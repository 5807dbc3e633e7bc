"""The MLflow tracking store: which one, creating it once, and retrying transient errors.

The default store is a SQLite database at the repository root with artifacts in a repo-root
folder; `MLFLOW_TRACKING_URI` (or `tracking.uri`) points the same code at a team's server.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote

from .. import project
from ..config import TrackingConfig
from ..errors import TrackingError, describe_error
from . import locks

T = TypeVar("T")


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
    """The database file of a local `sqlite:///` URI, as SQLAlchemy reads it (without its
    `?options`, percent-escapes decoded); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))


def not_created(uri: str) -> bool:
    """Whether `uri` is a local SQLite store whose file does not exist yet: opening it would
    create an empty one, so readers check this first."""
    database = sqlite_file(uri)
    return database is not None and not database.is_file()


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
            with locks.held("mlflow-store", None):
                experiment_id = _get_or_create_experiment(cfg, artifacts)
                _use_wal(database)
            return experiment_id
        if uri.startswith("https://"):
            check_certificate(uri)
        return retry(lambda: _get_or_create_experiment(cfg, artifacts))
    except (MlflowException, OSError, sqlite3.Error) as err:
        raise TrackingError(
            f"tracking store {uri} is not usable: {str(err).splitlines()[0][:300]} "
            "(check MLFLOW_TRACKING_URI / tracking.uri, and that the server is up)"
        ) from None


CERT_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"


def check_certificate(uri: str) -> None:
    """One clear line when an https tracking server's certificate is not trusted (MLflow
    itself would retry for a minute, then print a stack of connection errors)."""
    import ssl
    import urllib.error
    import urllib.request

    cafile = os.environ.get(CERT_ENV) or None
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as err:
        raise TrackingError(
            f"{CERT_ENV}={cafile}: not a CA certificate file "
            f"({getattr(err, 'strerror', None) or err})"
        ) from None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=30, context=context).close()
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLCertVerificationError):
            trusted = f"the CA in {cafile}" if cafile else "this machine's public CAs"
            raise TrackingError(
                f"{uri}: its TLS certificate is not signed by {trusted} "
                f"({err.reason.verify_message}); set {CERT_ENV} to the team's CA "
                "certificate (the ca.pem that came with your login)"
            ) from None
    except OSError:
        pass  # any other failure: MLflow's own retries and message


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


# Signs of a store that is busy or away for a while, not of a wrong request.
TRANSIENT = (
    "database is locked",
    "busy",
    "connection",
    "timed out",
    "timeout",
    "max retries exceeded",
)
# A gateway's HTTP status as MLflow's REST client and HTTP servers word it; a bare "503" is
# not one (about one random run id in 140 contains it, and a model may be version 503).
TRANSIENT_STATUS = re.compile(
    r"error code 50[234]\b|\b50[234] (?:error|bad gateway|service unavailable|gateway time-?out)"
)
# What MLflow says of a wrong request: never worth a retry, whatever the message contains.
PERMANENT_CODES = (
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
)
# How long a call keeps retrying a store that does not answer before the stage gives up with
# one line: long enough for a server restart, short enough that nothing seems to hang.
RETRY_S = 60.0
RETRY_ENV = "MNIST_PIPELINE_RETRY_S"
# MLflow's own HTTP retries for a tracking server, per call (its defaults add up to minutes).
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def retry(fn: Callable[[], T], *, within_s: float | None = None, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient store errors ("database is locked", a server that does not
    answer) for up to `within_s` seconds (default: `$MNIST_PIPELINE_RETRY_S`, else 60); then
    raise `TrackingError` with one line."""
    from mlflow.exceptions import MlflowException

    if within_s is None:
        within_s = float(os.environ.get(RETRY_ENV) or RETRY_S)
    deadline = time.monotonic() + within_s
    for attempt in itertools.count():
        try:
            return fn()
        except (MlflowException, OSError) as err:
            if not is_transient(err):
                raise
            if time.monotonic() >= deadline:
                raise TrackingError(
                    f"the tracking store {current_uri()} did not answer within "
                    f"{within_s:.0f} s ({describe_error(err)}); nothing more was recorded: "
                    "rerun once it is back"
                ) from None
            pause = min(base_delay * (2**attempt), 5.0) * (0.5 + random.random())
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
    raise AssertionError("unreachable")


def is_transient(err: BaseException) -> bool:
    if getattr(err, "error_code", None) in PERMANENT_CODES:
        return False
    text = str(err).lower()
    return any(sign in text for sign in TRANSIENT) or bool(TRANSIENT_STATUS.search(text))


def current_uri() -> str:
    """The store MLflow is pointed at, as errors name it (no password)."""
    import mlflow

    return locks.public_url(mlflow.get_tracking_uri())


def silence() -> None:
    """Quiet MLflow's informational chatter on stage output."""
    for name in ("mlflow", "alembic", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)


def use_store(cfg: TrackingConfig) -> str:
    """Point MLflow at the store to read from it (creates nothing); return the store's URI."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    return uri
