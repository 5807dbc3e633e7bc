"""Two machines promote at once (docs/reliability.md row 18): two checkouts of the project,
each with its own working tree and DVC cache, evaluate candidates against one team server at
the same moment, round after round. Each round has a champion and two candidates that both
beat it, one better than the other: only the lock both checkouts see (an advisory lock on
the team's PostgreSQL) keeps the worse one from being promoted over the better one."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import repo
from helpers.digits import graded_model, synthetic_digits
from helpers.team import client_env

from mnist_pipeline import config
from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.errors import PromotionError
from mnist_pipeline.files import write_json

pytestmark = [pytest.mark.slow, pytest.mark.team]

# Without the shared lock (each checkout with its own file lock), 12 rounds on a 2-core AMD
# EPYC each broke the history's order, and 6 of them left the worse model champion: a few
# rounds find a missing or broken lock.
ROUNDS = 6
WORKER = Path(__file__).with_name("race_worker.py")
TEST_IMAGES = 200  # 20 per class: a model that misreads k classes scores 1 - k/10


def logged(model, test: Split, name: str, experiment: str) -> dict:
    """A training run as the train stage leaves it: the model logged, the test set's hash."""
    from mnist_pipeline.tracking import runs
    from mnist_pipeline.training import calibration, job

    with runs.run(
        experiment,
        run_name=name,
        tags={"data.test_sha256": test.sha256(), "data.sha256": "synthetic"},
    ) as run_id:
        uri = job.log_served(model, calibration.IDENTITY)
    return {"run_id": run_id, "model_uri": uri}


def test_two_checkouts_promoting_at_once_keep_the_better_model(tmp_path, team_stack, monkeypatch):
    from mnist_pipeline.evaluation import rollback
    from mnist_pipeline.tracking import history, locks, registry, store
    from mnist_pipeline.training import models

    env = client_env(team_stack)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    checkouts = [repo.make(tmp_path / "a", gate={"min_class_recall": 0.0})]
    repo.run(["git", "clone", "-q", str(checkouts[0]), str(tmp_path / "b")], tmp_path)
    checkouts.append(tmp_path / "b")
    test = Split(*synthetic_digits(TEST_IMAGES, seed=3))
    corrupted = corruptions.generate(test.images, ["fog"], seed=0)
    for checkout in checkouts:
        save_split(checkout / "data/processed", "test", test)
        suite.save(checkout / "data/corrupted", corrupted, test, seed=0)
    params = yaml.safe_load((checkouts[0] / "params.yaml").read_text())
    experiment = store.connect(
        config.section({"tracking": {**params["tracking"], "experiment_name": "race"}}, "tracking")
    )

    # Seven models in all (misreading 0 to 6 classes), each trained once: a round registers
    # them under its own model name, as a team registers one run's model wherever it is
    # needed.
    graded = {k: graded_model(tuple(range(k))) for k in range(7)}
    trained = {k: logged(model, test, f"misreads-{k}", experiment) for k, model in graded.items()}
    rng = np.random.default_rng(7)
    expected = []
    for index in range(ROUNDS):
        name = f"race-{index}"
        # The champion misreads 6 classes; the candidates fewer: both would pass alone.
        champion = trained[6]
        version = registry.register(
            champion["model_uri"],
            name,
            tags={"model_sha256": f"champion-{index}", "data.test_sha256": test.sha256()},
        )
        registry.promote(name, str(version.version))
        better = int(rng.integers(0, 3))
        worse = int(rng.integers(better + 1, 6))
        order = [better, worse] if rng.random() < 0.5 else [worse, better]
        for checkout, broken in zip(checkouts, order, strict=True):
            folder = checkout / "race" / str(index)
            folder.mkdir(parents=True)
            models.save(graded[broken], folder / "model.keras")
            write_json(folder / "run.json", trained[broken])
        expected.append((name, 1 - better / 10))

    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(ROUNDS)],
            cwd=checkout,
            env=repo.env(**env, DVC_ROOT=str(checkout)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for checkout in checkouts
    ]
    versions = []
    try:
        for index, (name, accuracy) in enumerate(expected):
            for checkout in checkouts:
                (checkout / "race" / f"go-{index}").touch()
            outcomes = [
                _wait_for(checkout / "race" / f"done-{index}", worker)
                for checkout, worker in zip(checkouts, workers, strict=True)
            ]
            for outcome in outcomes:
                assert "error" not in outcome, outcome.get("error")
            held = registry.champion(name)
            tags = held.tags
            assert float(tags["test_accuracy"]) == pytest.approx(accuracy), (index, outcomes)
            passed = [o for o in outcomes if o["passed"]]
            assert passed and held.version in {o["version"] for o in passed}, outcomes
            versions.append(sorted(o["version"] for o in outcomes))
            # Both decisions are in the server's registry history, in the lock's order.
            first, second = history.entries(name)
            assert (first["seq"], second["seq"]) == (1, 2)
            assert {first["candidate"], second["candidate"]} == {"2", "3"}
            assert (first["champion_before"], second["champion_before"]) == (
                "1",
                first["champion_after"],
            )
            assert second["champion_after"] == held.version
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    # Every candidate got a version of its own (the champion was v1), and nothing crashed.
    assert all(v == ["2", "3"] for v in versions), versions

    # A rollback on the server, under the advisory lock: v1 never passed a gate, so only a
    # forced move reaches it, and the history says so.
    name = expected[-1][0]
    with pytest.raises(PromotionError, match="never passed the gate"):
        rollback.move(
            name,
            "v1",
            "back to the hand-made champion",
            test_sha256=test.sha256(),
            lock_url=locks.lock_url(None),
        )
    rollback.move(
        name,
        "v1",
        "back to the hand-made champion",
        test_sha256=test.sha256(),
        force=True,
        lock_url=locks.lock_url(None),
    )
    assert str(registry.champion(name).version) == "1"
    assert [e["outcome"] for e in history.entries(name)][-1] == "forced"


def _wait_for(path: Path, worker: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if worker.poll() is not None and not path.exists():
            pytest.fail(
                f"a worker stopped ({worker.returncode}) before {path.name}: "
                f"{worker.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)
    return json.loads(path.read_text())
