"""The promotion history in the registry: entries, their order, their size, and two processes
appending at once through the real promotion lock. Real MLflow SQLite stores in tmp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import config as test_config
from helpers import empty_store

from mnist_pipeline.tracking import history, locks, store

NAME = "mnist-classifier"


@pytest.fixture()
def model(tmp_path, monkeypatch) -> str:
    """An empty registered model NAME in a fresh SQLite store (the repo root is tmp_path)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.connect(test_config.section("tracking", uri=empty_store.place(tmp_path / "mlflow.db")))
    MlflowClient().create_registered_model(NAME)
    return NAME


def _verdict(passed: bool) -> dict:
    return {
        "passed": passed,
        "reason": "min_accuracy: 0.9410 < 0.9500"
        if not passed
        else "beats champion v1 by +0.0100 (p=0.0100 < 0.05)",
        "p_value": 0.01,
        "rules": [
            {
                "name": "min_accuracy",
                "passed": passed,
                "value": 0.941,
                "threshold": 0.95,
                "detail": "...",
            }
        ],
    }


def test_gate_entries_record_outcome_rules_and_who(model):
    history.append(
        model,
        history.gate_entry(
            _verdict(True), candidate="1", champion_before=None, champion_after="1", run_id="r1"
        ),
    )
    history.append(
        model,
        history.gate_entry(
            _verdict(True), candidate="1", champion_before="1", champion_after="1", run_id="r1"
        ),
    )
    history.append(
        model,
        history.gate_entry(
            _verdict(False), candidate="2", champion_before="1", champion_after="1", run_id="r2"
        ),
    )
    entries = history.entries(model)
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert [e["outcome"] for e in entries] == ["promoted", "kept", "rejected"]
    last = entries[-1]
    assert last["rules"] == [
        {"rule": "min_accuracy", "passed": False, "value": 0.941, "threshold": 0.95}
    ]
    assert last["reason"] == "min_accuracy: 0.9410 < 0.9500" and last["p_value"] == 0.01
    assert last["time"].endswith("Z") and last["user"] and last["host"]
    assert {"git_commit", "git_dirty", "dvc_experiment"} <= set(last)
    assert (last["candidate"], last["champion_before"], last["champion_after"]) == ("2", "1", "1")


def test_tags_are_zero_padded_so_they_sort_as_text(model):
    from mlflow import MlflowClient

    for _ in range(3):
        history.append(model, {"outcome": "promoted"})
    keys = sorted(
        k for k in MlflowClient().get_registered_model(model).tags if k.startswith(history.PREFIX)
    )
    assert keys == [f"champion.history.00000{n}" for n in (1, 2, 3)]


def test_an_entry_stays_under_the_registry_column_size():
    long = {
        "reason": "x" * 20_000,
        "rules": [{"rule": "r", "value": "y" * 3000}] * 5,
        "p_value": 0.0123,
        "candidate": "7",
    }
    text = history.encode(long)
    assert len(text) <= history.MAX_CHARS
    decoded = json.loads(text)
    assert decoded["p_value"] == 0.0123 and decoded["candidate"] == "7"  # numbers kept whole
    assert decoded["reason"].endswith("…")


def test_no_model_means_no_history(model):
    assert history.entries("no-such-model") == []


WORKER = """
import sys, time
from pathlib import Path
from mnist_pipeline.tracking import history, locks, store
from mnist_pipeline.config import section
import yaml
worker, count, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
store.use_store(section(yaml.safe_load(Path(sys.argv[4]).read_text()), "tracking"))
(go.parent / f"ready-{worker}").touch()  # MLflow imported: waiting for the go
while not go.exists():
    time.sleep(0.005)
for index in range(count):
    with locks.held("registry", None):
        history.append("mnist-classifier", {"outcome": "promoted", "candidate": worker,
                                            "index": index})
"""


def test_two_processes_appending_at_once_get_distinct_ordered_numbers(model, tmp_path):
    """Each worker appends under the promotion lock (a file lock in this checkout); without
    it, both would read the same highest number and overwrite each other's entry."""
    params = test_config.write_params(
        tmp_path, tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    )
    go, count = tmp_path / "go", 6
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, name, str(count), str(go), str(params)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready-{name}").exists() for name in ("a", "b")):
        assert time.monotonic() < deadline, "the workers never got ready"
        assert all(w.poll() is None for w in workers), [w.stderr.read() for w in workers]
        time.sleep(0.01)
    go.touch()  # both have imported MLflow and wait for it
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-3000:]
    entries = history.entries(model)
    assert [e["seq"] for e in entries] == list(range(1, 2 * count + 1))  # none lost
    for name in ("a", "b"):  # each worker's decisions in the order it made them
        assert [e["index"] for e in entries if e["candidate"] == name] == list(range(count))
    assert (tmp_path / locks.LOCK_DIR / "registry.lock").exists()
