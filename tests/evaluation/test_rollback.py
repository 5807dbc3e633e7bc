"""Moving the champion by hand: `mnist-pipeline champion rollback` refuses a version that never
passed the gate or was scored on another test set, moves to one that passed, records every
move (forced ones as forced), and leaves the champion record right. `champion history`
prints it newest first. Real MLflow SQLite stores and the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import config as test_config
from helpers import empty_store
from helpers.digits import synthetic_digits

from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.errors import PromotionError
from mnist_pipeline.evaluation import rollback
from mnist_pipeline.tracking import champion_record, history, registry, store

NAME = "mnist-classifier"


@pytest.fixture()
def checkout(tmp_path, monkeypatch):
    """A checkout with params.yaml, today's test split, and a store holding four versions:
    v1 and v2 passed the gate on today's test set (v2 is champion), v3 never passed, v4
    passed on another test set. Returns today's test-set hash."""
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    test_config.write_params(tmp_path)
    empty_store.place(tmp_path / "mlflow.db")  # the default store, at the root
    test = Split(*synthetic_digits(50, seed=3))
    save_split(tmp_path / "data" / "processed", "test", test)
    today = test.sha256()
    cfg = test_config.section("tracking")
    experiment_id = store.connect(cfg)
    client = MlflowClient()
    client.create_registered_model(NAME)
    for passed, scored_on in (
        ("true", today),
        ("true", today),
        ("false", today),
        ("true", "0" * 64),
    ):
        run_id = client.create_run(experiment_id).info.run_id
        client.create_model_version(
            NAME,
            source=f"runs:/{run_id}/model",
            run_id=run_id,
            tags={"gate.passed": passed, "data.test_sha256": scored_on},
        )
    registry.promote(NAME, "2")
    return today


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "mnist_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _champion() -> str:
    return str(registry.champion(NAME).version)


def test_rollback_to_a_version_that_passed_moves_and_records_who_and_why(checkout):
    done = _cli("champion", "rollback", "--to", "v1", "--reason", "v2 misreads sevens")
    assert done.returncode == 0, done.stderr
    assert "champion: mnist-classifier v1 (rolled back; was v2); history entry 1" in done.stdout
    assert _champion() == "1"
    [entry] = history.entries(NAME)
    assert (entry["action"], entry["outcome"]) == ("rollback", "rolled back")
    assert (entry["candidate"], entry["champion_before"], entry["champion_after"]) == (
        "1",
        "2",
        "1",
    )
    assert entry["reason"] == "v2 misreads sevens" and entry["user"] and entry["time"]
    assert entry["checks"][0] == "passed the gate before"


@pytest.mark.parametrize(
    ("to", "why"),
    [
        ("v3", "v3 of mnist-classifier never passed the gate"),
        ("v4", "v4 of mnist-classifier was scored on test set 000000000000…, today's is "),
        ("v9", "mnist-classifier has no version 9"),
        ("v2", "v2 is already the champion of mnist-classifier; nothing moved"),
        ("seven", "--to 'seven': expected a version such as v3 or 3"),
    ],
)
def test_refused_moves_change_nothing(checkout, to, why):
    with pytest.raises(PromotionError, match="^" + why.replace("(", r"\(").replace(")", r"\)")):
        rollback.move(NAME, to, "because", test_sha256=checkout)
    assert _champion() == "2" and history.entries(NAME) == []


def test_the_command_refuses_with_one_line_and_a_nonzero_status(checkout):
    done = _cli("champion", "rollback", "--to", "3", "--reason", "try")
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == (
        "mnist-pipeline: error: v3 of mnist-classifier never passed the gate, so it cannot be "
        "rolled back to; to promote it anyway: --force --reason '...'"
    )
    assert _champion() == "2"
    missing = _cli("champion", "rollback", "--to", "v1")
    assert missing.returncode == 2 and "--reason" in missing.stderr  # argparse: required


def test_the_version_left_behind_is_withdrawn_until_the_alias_moves_back(checkout):
    from mlflow import MlflowClient

    def withdrawn(number: str) -> str | None:
        return MlflowClient().get_model_version(NAME, number).tags.get(registry.WITHDRAWN)

    rollback.move(NAME, "v1", "v2 misreads sevens", test_sha256=checkout)
    assert withdrawn("2").endswith(": champion moved to v1: v2 misreads sevens")
    assert withdrawn("1") is None
    rollback.move(NAME, "v2", "the sevens were a scanner fault", test_sha256=checkout)
    assert withdrawn("2") is None and "champion moved to v2" in withdrawn("1")


def test_a_forced_move_is_recorded_as_forced(checkout):
    move = rollback.move(NAME, "v4", "hotfix for a customer", test_sha256=checkout, force=True)
    assert move.forced and _champion() == "4"
    [entry] = history.entries(NAME)
    assert (entry["action"], entry["outcome"]) == ("force", "forced")
    assert entry["checks"] == ["forced: passed the gate before: yes; test set as today's: no"]


def test_a_version_that_passed_earlier_in_the_history_may_be_rolled_back_to(checkout):
    """Its tag says the last gate rejected it (re-evaluated later), but it passed before."""
    from mlflow import MlflowClient

    history.append(
        NAME,
        history.gate_entry(
            {"passed": True, "reason": "ok", "p_value": None, "rules": []},
            candidate="3",
            champion_before=None,
            champion_after="3",
            run_id="r",
        ),
    )
    assert MlflowClient().get_model_version(NAME, "3").tags["gate.passed"] == "false"
    rollback.move(NAME, "3", "back to v3", test_sha256=checkout)
    assert _champion() == "3"


def test_after_a_rollback_the_champion_record_names_the_new_champion(checkout, tmp_path):
    """gate.json still names the champion the last evaluate left (v2): the record becomes
    v1, so the next `dvc repro` re-evaluates this workspace's model against v1."""
    gate = tmp_path / "gate.json"
    gate.write_text(
        json.dumps(
            {
                "registered_model": NAME,
                "champion_version": "2",
                "champion_record": {"registered_model": NAME, "version": "1"},
            }
        )
    )
    cfg = test_config.section("tracking")
    assert champion_record.decide(cfg, gate).left_by_evaluate
    rollback.move(NAME, "v1", "v2 regressed", test_sha256=checkout)
    decision = champion_record.decide(cfg, gate)
    assert not decision.left_by_evaluate and decision.record["version"] == "1"


def test_history_prints_newest_first_as_a_table_or_json(checkout):
    history.append(
        NAME,
        history.gate_entry(
            {
                "passed": False,
                "reason": "min_accuracy: 0.9410 < 0.9500",
                "p_value": 0.25,
                "rules": [],
            },
            candidate="3",
            champion_before="2",
            champion_after="2",
            run_id="r",
        ),
    )
    rollback.move(NAME, "v1", "v2 regressed", test_sha256=checkout)
    done = _cli("champion", "history")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "time", "(UTC)", "outcome"]
    assert lines[1].split()[:1] == ["2"] and "rolled back" in lines[1] and "v2 -> v1" in lines[1]
    assert lines[2].split()[0] == "1" and "rejected" in lines[2] and "0.25" in lines[2]
    assert "min_accuracy: 0.9410 < 0.9500" in lines[2]
    as_json = json.loads(_cli("champion", "history", "--json", "--limit", "1").stdout)
    assert [e["seq"] for e in as_json] == [2] and as_json[0]["reason"] == "v2 regressed"
    other = _cli("champion", "history", "--model", "another-model")
    assert other.returncode == 0 and "another-model: no decisions recorded yet" in other.stdout
