"""The team's servers go away (docs/reliability.md row 17): the tracking server in the middle of
training, PostgreSQL in the middle of the gate. The stage fails with one clear line after a
bounded wait, the champion alias does not move, DVC records nothing, and the same command
completes once the server is back."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from helpers import repo
from helpers.team import client_env

from mnist_pipeline.team import stack as stacks

pytestmark = [pytest.mark.slow, pytest.mark.team]

RETRY_S = 8  # how long the stages keep retrying here (60 s by default)
# MLflow's own retries of each HTTP call inside that window (3 by default, tracking/store.py).
ENV = {"MNIST_PIPELINE_RETRY_S": str(RETRY_S), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}


def _champion(stack: stacks.Stack) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return (
            MlflowClient(stack.tracking_uri)
            .get_model_version_by_alias("mnist-classifier", "champion")
            .version
        )
    except MlflowException:
        return None


def _epochs_logged(stack: stacks.Stack) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("mnist")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    return max((len(client.get_metric_history(r.info.run_id, "loss")) for r in runs), default=0)


def _locked_stages(path) -> set[str]:
    lock = path / "dvc.lock"
    return (
        set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.exists() else set()
    )


def _one_error_line(stderr: str, stage: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith(f"{stage}: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_tracking_server_lost_mid_training(tmp_path, team_stack):
    path = repo.make(tmp_path / "repo", epochs=150, train={"batch_size": 8})
    env = {**client_env(team_stack), **ENV}
    proc = repo.start(["dvc", "repro"], path, **env)
    deadline = time.monotonic() + 300
    while _epochs_logged(team_stack) < 2:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training logged no epoch"
        time.sleep(0.3)
    os.killpg(team_stack.server_pid, signal.SIGKILL)  # the server dies, no goodbye
    lost = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    waited = time.monotonic() - lost
    assert proc.returncode != 0
    line = _one_error_line(stderr, "train")
    assert "did not answer within" in line and team_stack.tracking_uri in line, line
    # Bounded: the stage's retry window, MLflow's own retries of one call and the end of
    # the run (10 s at most), not minutes.
    assert waited < RETRY_S + 60, waited
    assert not (path / "models/model.keras").exists()
    assert "train" not in _locked_stages(path)

    stacks.up(team_stack.root, team_stack.port, team_stack.postgres_port)
    stack = stacks.load(team_stack.root)
    assert _champion(stack) is None  # nothing was promoted while the server was away
    # The 150 epochs only kept training going long enough to lose the server mid-run.
    repo.set_params(path, "train", epochs=2)
    done = repo.run(["dvc", "repro"], path, **env)
    assert "gate: PASSED" in done.stdout
    assert _champion(stack) == "1"
    assert {"train", "evaluate"} <= _locked_stages(path)


def test_postgres_lost_during_the_gate(tmp_path, team_stack):
    path = repo.make(tmp_path / "repo", epochs=2)
    env = {**client_env(team_stack), **ENV}
    repo.run(["dvc", "repro"], path, **env)
    stack = stacks.load(team_stack.root)
    before = _champion(stack)
    gate_before = (path / "gate.json").read_text()
    lock_before = (path / "dvc.lock").read_text()

    stack.cluster.stop(mode="immediate")  # the database goes away under the server
    try:
        done = repo.run(["dvc", "repro", "-f", "-s", "evaluate"], path, check=False, **env)
        assert done.returncode != 0
        line = _one_error_line(done.stderr, "evaluate")
        assert any(s in line for s in ("did not answer", "lock database", "not usable")), line
        # DVC removes a stage's outputs before it runs it: no verdict is left, and none
        # half-written; dvc.lock still holds the last completed run.
        gate = path / "gate.json"
        assert not gate.exists() or gate.read_text() == gate_before
        assert (path / "dvc.lock").read_text() == lock_before
    finally:
        stack.cluster.start()
    assert _champion(stack) == before
    done = repo.run(["dvc", "repro", "-f", "-s", "evaluate"], path, **env)
    assert "gate:" in done.stdout
    assert _champion(stack) == before  # the same model again: it stays champion
