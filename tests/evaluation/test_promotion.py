"""The evaluate stage end to end: measure, register, gate, and move `champion` safely."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import config as test_config
from helpers import empty_store
from helpers import repo
from helpers.digits import ROOT, synthetic_digits

from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.evaluation import promotion
from mnist_pipeline.files import sha256_file
from mnist_pipeline.tracking import history
from mnist_pipeline.tracking.registry import champion, find_version
from mnist_pipeline.training import job


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """Processed synthetic splits, a private store, and the repo root at tmp_path."""
    for name, n, seed in (("train", 400, 1), ("val", 100, 2), ("test", 300, 3)):
        save_split(tmp_path / "processed", name, Split(*synthetic_digits(n, seed)))
    test = Split(*synthetic_digits(300, 3))
    suite.save(
        tmp_path / "corrupted",
        corruptions.generate(test.images, ["fog", "translate"], seed=0),
        test,
        seed=0,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store.place(tmp_path / "mlflow.db"))
    return tmp_path


def _paths(root, name: str):
    return test_config.values(
        "paths",
        processed=str(root / "processed"),
        corrupted=str(root / "corrupted"),
        model=str(root / name / "model.keras"),
        run=str(root / name / "run.json"),
        train_metrics=str(root / name / "train.json"),
        train_history=str(root / name / "history.csv"),
        eval_metrics=str(root / name / "evaluate.json"),
        eval_plots=str(root / name / "plots"),
        gate=str(root / name / "gate.json"),
    )


def _train(root, name: str, *, epochs: int, optimizer: dict, seed: int = 1):
    train_job = test_config.train_job(
        model={"name": "mlp", "hidden_units": [32]},
        optimizer=optimizer,
        train={"epochs": epochs, "verbose": 0, "seed": seed},
        paths=_paths(root, name),
    )
    job.write_outputs(job.train(train_job), train_job.paths)
    return train_job.paths


GOOD = {"epochs": 4, "optimizer": {"name": "adam", "learning_rate": 0.003}}
WEAK = {"epochs": 1, "optimizer": {"name": "sgd", "learning_rate": 0.0005}}
# The robustness and calibration rules run, with bounds these models always meet (their own
# tests are in test_gate_shift.py); each decision is tested at alpha.
LENIENT = {
    "min_accuracy": 0.0,
    "min_class_recall": 0.0,
    "max_ece": 1.0,
    "robustness_margin": 1.0,
    "reuse": False,
}


def _evaluate(paths, **gate):
    return promotion.evaluate(
        paths,
        test_config.section("evaluate"),
        test_config.section("gate", **{**LENIENT, **gate}),
        test_config.section("tracking"),
    )


@pytest.mark.slow
def test_first_candidate_becomes_champion_then_a_worse_one_is_rejected(workspace):
    good = _train(workspace, "good", **GOOD)
    first = _evaluate(good)
    assert first.verdict.passed and first.version == "1" and first.champion_after == "1"
    report = json.loads((workspace / "good/gate.json").read_text())
    assert report["passed"] is True and report["champion_version_before"] is None
    assert {r["name"] for r in report["rules"]} == {
        "test_set_nonempty",
        "metrics_present",
        "test_data_matches_training",
        "min_accuracy",
        "min_class_recall",
        "served_parity",
        "calibrated",
    }
    assert str(champion("mnist-classifier").version) == "1"
    for name in ("confusion.csv", "class_recall.csv", "confusion.png", "misclassified.png"):
        assert (workspace / "good/plots" / name).stat().st_size > 0
    metrics = json.loads((workspace / "good/evaluate.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(first.scores.accuracy, abs=1e-6)

    weak = _train(workspace, "weak", **WEAK)
    second = _evaluate(weak)
    assert not second.verdict.passed and second.version == "2"
    assert second.champion_before == "1" and second.champion_after == "1"
    assert str(champion("mnist-classifier").version) == "1", "champion unchanged"
    failed = {r.name for r in second.verdict.failed()}
    assert "beats_champion" in failed
    version = find_version("mnist-classifier", "model_sha256", sha256_file(weak.model))
    assert version.tags["gate.passed"] == "false"

    # Both decisions are in the registry's history; each version has its model card.
    entries = history.entries("mnist-classifier")
    assert [(e["seq"], e["outcome"], e["candidate"], e["champion_after"]) for e in entries] == [
        (1, "promoted", "1", "1"),
        (2, "rejected", "2", "1"),
    ]
    assert entries[1]["reason"] == second.verdict.reason
    assert {r["rule"] for r in entries[1]["rules"]} >= {"beats_champion", "min_accuracy"}
    card_text = (workspace / "weak/plots/model_card.md").read_text()
    assert card_text.startswith("# Model card: mnist-classifier v2\n")
    assert "REJECTED: " in card_text
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient().list_artifacts(version.run_id, "evaluation")}
    assert {"evaluation/model_card.md", "evaluation/model_card.html"} <= logged


@pytest.mark.slow
def test_evaluating_the_same_model_twice_registers_one_version(workspace):
    good = _train(workspace, "good", **GOOD)
    first = _evaluate(good)
    again = _evaluate(good)
    assert first.version == again.version == "1"
    assert json.loads((workspace / "good/gate.json").read_text())["registered_now"] is False
    from mlflow import MlflowClient

    assert len(MlflowClient().search_model_versions("name = 'mnist-classifier'")) == 1


@pytest.mark.slow
def test_test_data_differing_from_training_is_refused(workspace):
    from mnist_pipeline.errors import DataError

    good = _train(workspace, "good", **GOOD)
    other = Split(*synthetic_digits(300, seed=99))
    save_split(workspace / "processed", "test", other)
    # The corrupted suite was made from the old test split: one line saying what to rerun.
    with pytest.raises(DataError, match="made from test split .*; rerun: dvc repro corrupt"):
        _evaluate(good)
    # As `dvc repro` would: the suite made again from the new test split, then the gate.
    suite.save(
        workspace / "corrupted", corruptions.generate(other.images, ["fog"], seed=0), other, seed=0
    )
    decision = _evaluate(good)
    assert not decision.verdict.passed
    assert decision.verdict.failed()[0].name == "test_data_matches_training"
    assert champion("mnist-classifier") is None


@pytest.mark.slow
def test_fail_on_reject_exits_non_zero_with_one_line(workspace):
    weak = _train(workspace, "weak", **WEAK)
    done = subprocess.run(
        repo.python(
            str(ROOT / "pipelines/evaluate.py"),
            *_overrides(weak),
            "gate.min_accuracy=0.999",
            "gate.fail_on_reject=true",
        ),
        cwd=workspace,
        env=repo.env(
            MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}", DVC_ROOT=str(workspace)
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "gate: REJECTED" in done.stdout
    assert "evaluate: error: candidate rejected" in done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(open(weak.gate).read())["passed"] is False


def _overrides(paths) -> list[str]:
    return [f"paths.{key}={value}" for key, value in vars(paths).items()]


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(2))
def test_parallel_evaluations_leave_the_better_model_champion(workspace, round_):
    good = _train(workspace, "good", **GOOD)
    weak = _train(workspace, "weak", **WEAK)
    env = repo.env(
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}", DVC_ROOT=str(workspace)
    )
    lenient = [f"gate.{k}={v}" for k, v in LENIENT.items()]
    order = [good, weak] if round_ == 0 else [weak, good]
    procs = [
        subprocess.Popen(
            repo.python(str(ROOT / "pipelines/evaluate.py"), *_overrides(p), *lenient),
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in order
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    good_version = json.loads(open(good.gate).read())["candidate_version"]
    assert str(champion("mnist-classifier").version) == good_version
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions("name = 'mnist-classifier'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"], "unique versions"
    # Both decisions recorded, numbered in the order the lock let them in: the second saw
    # the champion the first left.
    first, second = history.entries("mnist-classifier")
    assert (first["seq"], second["seq"]) == (1, 2)
    assert {first["candidate"], second["candidate"]} == {"1", "2"}
    assert first["champion_before"] is None
    assert second["champion_before"] == first["champion_after"]
    assert second["champion_after"] == good_version


@pytest.mark.slow
def test_train_outputs_from_another_store_are_one_clear_error(workspace, monkeypatch):
    from mnist_pipeline.errors import TrackingError

    good = _train(workspace, "good", **GOOD)
    # The outputs stay (as a DVC cache would restore them); the store they were logged to
    # is not the one in use now.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'other.db'}")
    run_id = json.loads((workspace / "good/run.json").read_text())["run_id"]
    with pytest.raises(TrackingError) as raised:
        _evaluate(good)
    message = str(raised.value)
    assert message.startswith(
        f"{workspace / 'good/run.json'}: run {run_id} is not in the "
        f"tracking store sqlite:///{workspace / 'other.db'}"
    )
    assert "dvc repro -f train" in message and "\n" not in message
    assert not (workspace / "good/gate.json").exists()
