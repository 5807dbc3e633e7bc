"""Multi-worker training (docs/reliability.md row 20): `runtime.distribute=multi_worker` trains
one model with two worker processes on loopback, started by the train stage itself; only the
chief records the run and writes the outputs, and a lost worker fails the job, fast. (A whole
two-worker experiment, its one run and its accuracy: tests/team/test_walkthrough.py step 7.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import repo

pytestmark = pytest.mark.slow


def _runs(db: Path) -> list[tuple[str, str, str]]:
    """(run name, status, resolved workers) of every run in the store."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "select r.name, r.status, p.value from runs r left join params p on "
            "p.run_uuid = r.run_uuid and p.key = 'runtime.resolved_workers'"
        ).fetchall()


def _worker_pid(index: int) -> int | None:
    """The pid of the process whose TF_CONFIG names it worker `index` of a loopback job."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"TF_CONFIG="):
                spec = json.loads(item[len(b"TF_CONFIG=") :])
                if spec["task"]["index"] == index and "127.0.0.1" in spec["cluster"]["worker"][0]:
                    return int(entry.name)
    return None


def test_a_killed_worker_fails_the_job_quickly(tmp_path):
    path = repo.make(tmp_path / "repo", epochs=400, train={"batch_size": 8}, store=True)
    repo.run(["dvc", "repro", "preprocess"], path)
    proc = repo.start(
        repo.python(
            "pipelines/train.py",
            "runtime.distribute=multi_worker",
            "runtime.workers=2",
            "train.checkpoint.enabled=false",
        ),
        path,
    )
    repo.wait_for_epoch(path / "mlflow.db", 1, proc, timeout=300)
    pid = _worker_pid(1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60
    # The chief says why its step failed, the stage which worker was lost: no traceback.
    errors = [line for line in stderr.splitlines() if line.startswith("train: error:")]
    assert "worker 1 of 2 was killed by SIGKILL" in errors[-1], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    runs = _runs(path / "mlflow.db")
    assert [status for _, status, _ in runs] == ["FAILED"], runs
    assert _worker_pid(0) is None and _worker_pid(1) is None  # nothing left behind
    assert not (path / "models/model.keras").exists()


def test_a_stalled_worker_fails_the_job_within_the_timeout(tmp_path):
    path = repo.make(tmp_path / "repo", epochs=400, train={"batch_size": 8}, store=True)
    repo.run(["dvc", "repro", "preprocess"], path)
    proc = repo.start(
        repo.python(
            "pipelines/train.py",
            "runtime.distribute=multi_worker",
            "runtime.workers=2",
            "runtime.collective_timeout_s=8",
            "train.checkpoint.enabled=false",
        ),
        path,
    )
    repo.wait_for_epoch(path / "mlflow.db", 1, proc, timeout=300)
    pid = _worker_pid(1)
    os.kill(pid, signal.SIGSTOP)  # alive, silent: its peers' all-reduce never completes
    stopped = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - stopped < 8 + 40
    # TensorFlow's coordination service may notice the silent worker and abort the step, or
    # the watchdog ends the wait: either way one line says so, well within the bound.
    assert (
        "no step completed in 8 s (runtime.collective_timeout_s)" in stderr
        or "the step's all-reduce with the other workers failed" in stderr
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    assert _worker_pid(0) is None and _worker_pid(1) is None


def test_the_worker_named_is_the_one_killed_not_the_chief_that_exited_after_it():
    from mnist_pipeline.training.cluster import _cause

    # The chief (0) exits with an error as soon as the killed worker (1) breaks its all-reduce;
    # both ends may be seen in one poll.
    assert _cause([1, -9], first=0) == 1
    assert _cause([1, None], first=0) == 0
    assert _cause([None, 2, 1], first=1) == 1
