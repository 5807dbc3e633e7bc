"""Which store errors are worth retrying: a busy or unreachable store, not a wrong request."""

from __future__ import annotations

import time

import pytest

from mnist_pipeline.tracking.store import is_transient, retry


@pytest.mark.parametrize("message", [
    "(sqlite3.OperationalError) database is locked",
    "API request to endpoint /api/2.0/mlflow/runs/get failed with error code 503 != 200",
    "Max retries exceeded with url: /api/2.0/mlflow/experiments/get-by-name",
    "HTTPConnectionPool(host='127.0.0.1', port=5000): Read timed out.",
    "502 Bad Gateway",
])
def test_a_busy_or_unreachable_store_is_transient(message):
    assert is_transient(RuntimeError(message))


@pytest.mark.parametrize("message", [
    "Run with id=8f2a5035c1e94d0b9c4d7e1f6a2b3c4d not found",  # "503" inside a run id
    "Registered Model with name=mnist-5024 not found",
    "Run with id=aa504bb not found",
    "Invalid parameter value: 'learning_rate'",
])
def test_a_wrong_request_is_not_transient_even_with_a_status_like_number(message):
    assert not is_transient(RuntimeError(message))


def test_a_wrong_request_fails_at_once_instead_of_being_retried():
    from mlflow.exceptions import MlflowException

    calls = []

    def missing_run():
        calls.append(1)
        raise MlflowException("Run with id=c503c0ffee not found", "RESOURCE_DOES_NOT_EXIST")

    started = time.monotonic()
    with pytest.raises(MlflowException, match="not found"):
        retry(missing_run, within_s=30)
    assert calls == [1] and time.monotonic() - started < 5
