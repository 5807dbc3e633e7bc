"""Which store errors are worth retrying: a busy or unreachable store, not a wrong request."""

from __future__ import annotations

import time

import pytest

from mnist_pipeline.tracking.store import is_transient, retry, sqlite_file


@pytest.mark.parametrize(
    "message",
    [
        "(sqlite3.OperationalError) database is locked",
        "API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200",
        "Max retries exceeded with url: /api/2.0/mlflow/experiments/get-by-name",
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Read timed out.",
        "502 Bad Gateway",
    ],
)
def test_a_busy_or_unreachable_store_is_transient(message):
    assert is_transient(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    [
        "Run with id=8f2a5035c1e94d0b9c4d7e1f6a2b3c4d not found",  # "503" inside a run id
        "Registered Model with name=mnist-5024 not found",
        "Run with id=aa504bb not found",
        "Model Version (name=mnist-classifier, version=503) not found",
        "Registered Model with name=mnist-503 not found",
        "the upload took 0.503 s",
        "Invalid parameter value: 'learning_rate'",
    ],
)
def test_a_wrong_request_is_not_transient_even_with_a_status_like_number(message):
    assert not is_transient(RuntimeError(message))


def test_mlflows_own_verdict_on_a_wrong_request_wins_over_its_wording():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    assert not is_transient(
        MlflowException(
            "Registered Model with name=connection-timeout not found", RESOURCE_DOES_NOT_EXIST
        )
    )
    assert is_transient(MlflowException("database is locked"))


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("sqlite:////srv/mlruns/mlflow.db", "/srv/mlruns/mlflow.db"),
        ("sqlite:////tmp/a%20b/mlflow.db?timeout=20", "/tmp/a b/mlflow.db"),
        ("sqlite:///mlflow.db", "mlflow.db"),
        ("postgresql://mlflow@db/mlflow", None),
        ("http://127.0.0.1:5000", None),
    ],
)
def test_the_sqlite_file_is_the_one_sqlalchemy_opens(uri, expected):
    found = sqlite_file(uri)
    assert (None if found is None else str(found)) == expected


def test_a_wrong_request_fails_at_once_instead_of_being_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    calls = []

    def missing_run():
        calls.append(1)
        raise MlflowException("Run with id=c503c0ffee not found", RESOURCE_DOES_NOT_EXIST)

    started = time.monotonic()
    with pytest.raises(MlflowException, match="not found"):
        retry(missing_run, within_s=30)
    assert calls == [1] and time.monotonic() - started < 5
