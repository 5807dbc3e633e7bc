"""One Bayesian study shared by two machines (docs/reliability.md row 19): two checkouts, each
with its own working tree and DVC cache, run sweep workers on one Optuna study in the team's
PostgreSQL and log to the team's MLflow server. One worker is SIGKILLed in the middle of a
trial: its trial goes stale and is failed by the heartbeat, another takes its place, and the
study ends with exactly its budget of trials, every one nested under one parent run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from helpers import repo
from helpers.config import values
from helpers.team import client_env

pytestmark = [pytest.mark.slow, pytest.mark.team]

TRIALS = 5
SPACE = {
    "name": "shared",
    "n_trials": TRIALS,
    "n_jobs": 1,
    "heartbeat_s": 1,
    "grace_s": 4,
    "pruner": {"name": "none", "n_startup_trials": 0, "n_warmup_steps": 0, "threshold": None},
    "overrides": [
        "train.epochs=6",
        "train.verbose=0",
        "runtime.jit_compile=false",
        "runtime.steps_per_execution=1",
        "train.batch_size=16",
    ],
    "params": {
        "optimizer.learning_rate": "tag(log, interval(0.02, 0.2))",
        "model.hidden_units": "choice([16], [32, 16])",
    },
}


def _workers(pid: int) -> list[int]:
    """The sweep worker processes the coordinator `pid` started (not its resource tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(int(child))
    return found


def test_two_checkouts_fill_one_study_and_replace_a_killed_workers_trial(tmp_path, team_stack):
    import optuna
    from mlflow import MlflowClient

    a = repo.make(tmp_path / "a", commit=False)
    (a / "conf/sweep/shared.yaml").write_text(yaml.safe_dump(values("sweep", **SPACE)))
    repo.run(["git", "add", "-A"], a)
    repo.run(["git", "commit", "-qm", "pipeline and a shared sweep space"], a)
    repo.run(["git", "clone", "-q", str(a), str(tmp_path / "b")], tmp_path)
    b = tmp_path / "b"
    for checkout in (a, b):  # each machine prepares the data with its own DVC cache
        repo.run(["dvc", "repro", "preprocess"], checkout)

    env = client_env(team_stack)
    command = repo.python(
        "pipelines/sweep.py", "+sweep=shared", f"sweep.storage={team_stack.optuna_storage}"
    )
    coordinators = {
        name: repo.start(command, checkout, **env) for name, checkout in (("a", a), ("b", b))
    }
    storage = optuna.storages.RDBStorage(team_stack.optuna_storage)

    # Kill b's worker while both machines are in the middle of a trial.
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "the machines never ran trials side by side"
        for name, proc in coordinators.items():
            assert proc.poll() is None, f"{name}: {proc.communicate()[1][-3000:]}"
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
            running = [
                t
                for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.RUNNING
            ]
        except KeyError:
            running = []
        workers = _workers(coordinators["b"].pid)
        if len(running) == 2 and workers:
            break
        time.sleep(0.2)
    os.kill(workers[0], signal.SIGKILL)

    _, b_err = coordinators["b"].communicate(timeout=300)
    a_out, a_err = coordinators["a"].communicate(timeout=600)
    assert coordinators["a"].returncode == 0, a_err[-3000:]
    assert coordinators["b"].returncode != 0  # its worker was killed: it says so, in one line
    assert "sweep: error: worker(s) [0] stopped with an error" in b_err, b_err[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [
        t
        for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    stale = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.FAIL and "failure" not in t.user_attrs
    ]
    assert len(finished) == TRIALS, [(t.number, t.state) for t in trials]  # the budget, exactly
    assert len(stale) == 1, [(t.number, t.state, t.user_attrs) for t in trials]

    client = MlflowClient(team_stack.tracking_uri)
    experiment = client.get_experiment_by_name("mnist")
    every = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [
        r
        for r in every
        if r.data.tags.get("optuna.study") == "shared" and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1, [r.info.run_name for r in parents]  # b joined a's parent
    parent = parents[0].info.run_id
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent]
    logged = sorted(int(r.data.tags["optuna.trial"]) for r in children)
    # Every counted trial has its run under the one parent (the killed one has one too if it
    # had started training), and no trial has two.
    assert {t.number for t in finished} <= set(logged) <= {t.number for t in trials}, logged
    assert len(logged) == len(set(logged)), logged
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    assert "best val_accuracy" in a_out
