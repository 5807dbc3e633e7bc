"""Faults from docs/reliability.md that cut across stages: kills, bad config, NaN,
concurrent writers. (Mirror, archive, IDX, gate and loader faults live beside their
modules' tests.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from helpers import config as test_config
from helpers import repo

from mnist_pipeline.data.splits import load_split
from mnist_pipeline.files import sha256_file

pytestmark = pytest.mark.slow


def _lock(path):
    file = path / "dvc.lock"
    return file.read_text() if file.exists() else None


def _out_hashes(path) -> dict[str, str]:
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in ("fetch", "preprocess", "corrupt")
        for out in lock["stages"][stage]["outs"]
    }


# --- row 6: a stage killed ------------------------------------------------------------------


def test_killed_repro_leaves_lock_and_outputs_consistent(tmp_path):
    """The train stage killed mid-run by SIGINT (a terminal's Ctrl-C), SIGTERM (a scheduler)
    and SIGKILL, one after the other in one repository; then one rerun completes."""
    import os

    from mlflow import MlflowClient

    path = repo.make(tmp_path / "repo", epochs=400, store=True)
    repo.run(["dvc", "repro", "corrupt"], path)
    before, data = _lock(path), _out_hashes(path)
    client = MlflowClient(tracking_uri=repo.store(path))
    db = path / "mlflow.db"
    killed: list[str] = []  # the run ids, one per kill
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        proc = repo.start(["dvc", "repro"], path)
        repo.wait_for_epoch(db, repo.last_epoch(db) + 1, proc)  # mid-run
        if sig == signal.SIGKILL:
            repo.stop(proc, signal.SIGKILL)  # the whole process group, DVC and the stage
        else:
            os.killpg(proc.pid, sig)
            proc.communicate(timeout=120)
        assert proc.returncode != 0, sig
        assert _lock(path) == before, f"{sig!r}: dvc.lock records only completed stages"
        assert not (path / "models/model.keras").exists(), f"{sig!r}: a half-written model"
        assert not list((path / "models").glob(".*tmp*")) if (path / "models").exists() else True
        experiment = client.get_experiment_by_name("mnist").experiment_id
        (run,) = [r for r in client.search_runs([experiment]) if r.info.run_id not in killed]
        killed.append(run.info.run_id)
        # SIGKILL cannot be caught: that run is left RUNNING until the next train stage
        # reaps it.
        assert run.info.status == ("RUNNING" if sig == signal.SIGKILL else "KILLED"), sig

    # The rerun completes, and the data stages' outputs are the ones made before the kills.
    done = repo.run(["dvc", "exp", "run", "-S", "train.epochs=1"], path)
    assert "gate:" in done.stdout
    assert _out_hashes(path) == data
    assert set(yaml.safe_load((path / "dvc.lock").read_text())["stages"]) == {
        "fetch",
        "preprocess",
        "corrupt",
        "train",
        "champion",
        "evaluate",
    }
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert {statuses[run_id] for run_id in killed} == {"KILLED"}, "no run is left RUNNING"
    assert "RUNNING" not in statuses.values()


def test_killed_preprocess_never_leaves_a_trusted_partial_split(tmp_path):
    """Kill preprocess at moments spread over its run; a rerun always rebuilds the same arrays."""

    path = repo.make(tmp_path / "repo", n_train=60000)  # big enough to kill mid-write
    repo.run(["dvc", "repro", "fetch"], path)

    durations: list[float] = []

    def preprocess() -> None:
        """A whole run; the quickest one times the kills (the other tests' load varies, and
        a kill timed by a slow run comes after a quick one has ended)."""
        started = time.monotonic()
        repo.run(repo.python("pipelines/preprocess.py"), path)
        durations.append(time.monotonic() - started)

    preprocess()
    splits = ("train", "val", "test")
    reference = {s: sha256_file(path / f"data/processed/{s}.npz") for s in splits}
    interrupted = 0
    # Moments spread over the run; then, while fewer than two kills landed in a run, more
    # at its middle (at most three).
    fractions = [0.5, 0.65, 0.75, 0.85, 0.9, 0.95]
    while fractions:
        proc = repo.start(repo.python("pipelines/preprocess.py"), path)
        time.sleep(min(durations) * fractions.pop(0))
        if proc.poll() is None:
            repo.stop(proc, signal.SIGKILL)
            interrupted += 1
        for split in splits:  # whatever is at a final path is a whole, valid file
            if (path / f"data/processed/{split}.npz").exists():
                load_split(path / "data/processed", split)
        preprocess()
        assert {s: sha256_file(path / f"data/processed/{s}.npz") for s in splits} == reference
        if not fractions and interrupted < 2 and len(durations) < 10:
            fractions.append(0.5)
    assert interrupted >= 2, "the kills must land while preprocess is working"


# --- row 24: a failed experiment ------------------------------------------------------------


def test_failed_exp_leaves_the_workspace_as_it_was(tmp_path):
    """Two failed experiments, one after the other on one workspace: a value refused before
    any run, then a crash mid-run (row 8, the loss becomes NaN), whose run is FAILED."""
    from mlflow import MlflowClient

    path = repo.make(tmp_path / "repo", store=True)
    repo.run(["dvc", "repro"], path)
    kept = {
        str(file.relative_to(path)): sha256_file(file)
        for folder in ("models", "metrics", "plots", "data/processed", "data/corrupted")
        for file in sorted((path / folder).rglob("*"))
        if file.is_file()
    }
    assert "models/model.keras" in kept and "plots/evaluate/confusion.png" in kept
    params = (path / "params.yaml").read_text()
    client = MlflowClient(tracking_uri=repo.store(path))
    experiment = client.get_experiment_by_name("mnist").experiment_id
    failed: list[str] = []
    for override, needle, failed_runs in (
        ("train.epochs=0", "config 'train.epochs': got 0", []),
        ("optimizer.learning_rate=1e12", "loss became NaN", ["FAILED"]),
    ):
        done = repo.run(["dvc", "exp", "run", "-S", override], path, check=False)
        assert done.returncode != 0 and needle in done.stderr + done.stdout, done.stderr[-2000:]
        after = {name: sha256_file(path / name) for name in kept if (path / name).is_file()}
        assert after == kept, f"{override}: the failed experiment changed or removed outputs"
        assert (path / "params.yaml").read_text() != params  # DVC left the -S value there...
        ours = [line for line in done.stderr.splitlines() if line.startswith("train: ")]
        assert ours[-1].endswith("git checkout -- params.yaml"), ours  # ...and we say how back
        repo.run(["git", "checkout", "--", "params.yaml"], path)
        assert (path / "params.yaml").read_text() == params
        status = repo.run(["dvc", "status", "train"], path)
        assert "up to date" in status.stdout, status.stdout
        versions = [str(v.version) for v in client.search_model_versions()]
        assert versions == ["1"], f"{override}: registered {versions}"
        failed += failed_runs
        runs = client.search_runs([experiment])
        assert sorted(r.info.status for r in runs) == sorted(["FINISHED", *failed]), override


# --- row 9: invalid config ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "optimizer.learning_rate=-0.5",
            "config 'optimizer.learning_rate': got -0.5, expected a finite number > 0",
        ),
        (
            "train.batch_size=lots",
            "config 'train.batch_size': got 'lots', expected a value of type integer",
        ),
        ("optimizer=adagrad", "Could not find 'optimizer/adagrad'"),
        ("train.epocs=3", "Could not override 'train.epocs'"),
        (
            "+train.epocs=3",
            "config 'train.epocs': got 3, expected one of the known keys: batch_size",
        ),
    ],
)
def test_invalid_config_fails_before_any_work(tmp_path, override, needle):
    path = repo.make(tmp_path / "repo")
    done = repo.run(repo.python("pipelines/train.py", override), path, check=False)
    assert done.returncode != 0
    assert needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (path / "mlflow.db").exists(), "no tracking store touched"
    assert not (path / "models").exists()


def test_bad_params_yaml_fails_dvc_repro_naming_the_key(tmp_path):
    path = repo.make(tmp_path / "repo")
    repo.set_params(path, "fetch", read_timeout_s=-1)
    done = repo.run(["dvc", "repro", "fetch"], path, check=False)
    assert done.returncode != 0
    assert "config 'fetch.read_timeout_s': got -1" in done.stderr
    assert not (path / "data/raw").exists()


# --- row 10: several writers on one SQLite store --------------------------------------------

WRITER = textwrap.dedent("""
    import json, sys, time
    from mnist_pipeline import config
    from mnist_pipeline.tracking.runs import log_metrics, log_params, run, set_tags
    from mnist_pipeline.tracking.store import connect
    rounds, start = int(sys.argv[1]), float(sys.argv[2])
    cfg = config.section({"tracking": json.loads(sys.argv[4])}, "tracking")
    while time.time() < start:
        time.sleep(0.005)
    experiment = connect(cfg)
    for i in range(rounds):
        with run(experiment, run_name=f"w{sys.argv[3]}-{i}"):
            log_params({"round": i, "writer": sys.argv[3]})
            for step in range(3):
                log_metrics({"loss": 1.0 / (step + 1), "acc": step / 3}, step=step)
            set_tags({"writer": sys.argv[3]})
    print("done", sys.argv[3])
""")


def test_parallel_writers_on_one_sqlite_store(tmp_path):
    """4 writer processes start together on a brand-new store; 20 runs each, all recorded."""
    writers, rounds = 4, 20
    start = time.time() + 6  # every process imported and waiting before the first write
    tracking = json.dumps(test_config.values("tracking"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(rounds), str(start), str(w), tracking],
            cwd=tmp_path,
            env=repo.env(DVC_ROOT=str(tmp_path)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    errors = "\n".join(err for _, err in outputs)
    assert [p.returncode for p in procs] == [0] * writers, errors[-3000:]
    assert "database is locked" not in errors
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist").experiment_id], max_results=1000
    )
    assert len(runs) == writers * rounds
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) == 3 for r in runs[:10])
