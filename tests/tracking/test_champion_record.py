"""The champion record changes when the champion moved by anything but the last evaluate,
and only then; reading never creates a store. Real MLflow SQLite stores in tmp dirs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import config as test_config
from helpers import empty_store
from helpers.digits import ROOT

from mnist_pipeline import config
from mnist_pipeline.tracking import champion_record, registry, store

NAME = "mnist-classifier"


@pytest.fixture()
def no_store(tmp_path, monkeypatch) -> config.TrackingConfig:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return test_config.section("tracking", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture()
def tracking(no_store, tmp_path) -> config.TrackingConfig:
    """An empty store at the root."""
    empty_store.place(tmp_path / "mlflow.db")
    return no_store


def _versions(cfg: config.TrackingConfig, count: int) -> list[tuple[str, str]]:
    """`count` registered versions of NAME, each from its own run: (version, run id)."""
    from mlflow import MlflowClient

    experiment_id = store.connect(cfg)
    client = MlflowClient()
    client.create_registered_model(NAME)
    made = []
    for _ in range(count):
        run_id = client.create_run(experiment_id).info.run_id
        version = client.create_model_version(NAME, source=f"runs:/{run_id}/model", run_id=run_id)
        made.append((str(version.version), run_id))
    return made


def _gate(path: Path, *, left: str | None, ran_with: dict | None, name: str = NAME) -> Path:
    """A gate.json as evaluate writes it (only the keys the record reads)."""
    path.write_text(
        json.dumps(
            {
                "registered_model": name,
                "champion_version_before": None,
                "champion_version": left,
                "champion_record": ran_with,
            }
        )
    )
    return path


def _record(version: str | None, run_id: str | None) -> dict:
    return {"registered_model": NAME, "version": version, "run_id": run_id}


def test_no_store_means_no_champion_and_creates_none(no_store, tmp_path):
    decision = champion_record.decide(no_store, tmp_path / "gate.json")
    assert decision.record == _record(None, None) and not decision.left_by_evaluate
    assert not (tmp_path / "mlflow.db").exists()


def test_the_champion_now_when_no_evaluate_ran(tracking, tmp_path):
    (v1, run1), _ = _versions(tracking, 2)
    registry.promote(NAME, v1)
    decision = champion_record.decide(tracking, tmp_path / "gate.json")
    assert decision.record == _record(v1, run1)


@pytest.mark.parametrize("verdict", ["passed", "rejected"])
def test_evaluates_own_decision_keeps_the_record_it_ran_with(tracking, tmp_path, verdict):
    (v1, run1), (v2, _) = _versions(tracking, 2)
    registry.promote(NAME, v1)
    ran_with = _record(v1, run1)
    left = v2 if verdict == "passed" else v1
    registry.promote(NAME, left)  # what evaluate did (a pass moves the alias)
    gate = _gate(tmp_path / "gate.json", left=left, ran_with=ran_with)
    decision = champion_record.decide(tracking, gate)
    assert decision.record == ran_with and decision.left_by_evaluate
    # The first evaluate ran with no champion at all: it keeps that record as well.
    gate = _gate(tmp_path / "gate.json", left=left, ran_with=_record(None, None))
    assert champion_record.decide(tracking, gate).record == _record(None, None)


def test_a_move_from_outside_changes_the_record(tracking, tmp_path):
    (v1, run1), (v2, _), (v3, run3) = _versions(tracking, 3)
    registry.promote(NAME, v3)  # another experiment, or a person, moved it after evaluate
    gate = _gate(tmp_path / "gate.json", left=v2, ran_with=_record(v1, run1))
    decision = champion_record.decide(tracking, gate)
    assert decision.record == _record(v3, run3) and not decision.left_by_evaluate


def test_a_record_of_another_registered_model_is_not_trusted(tracking, tmp_path):
    ((v1, run1),) = _versions(tracking, 1)
    registry.promote(NAME, v1)
    gate = _gate(tmp_path / "gate.json", left=v1, ran_with=_record(None, None), name="other")
    assert champion_record.decide(tracking, gate).record == _record(v1, run1)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"champion_version": "1"}'])
def test_an_unreadable_or_older_gate_json_means_the_champion_now(tracking, tmp_path, content):
    ((v1, run1),) = _versions(tracking, 1)
    registry.promote(NAME, v1)
    (tmp_path / "gate.json").write_text(content)
    assert champion_record.decide(tracking, tmp_path / "gate.json").record == _record(v1, run1)


def test_the_sql_read_agrees_with_mlflow(tracking, tmp_path):
    from mlflow import MlflowClient

    database = tmp_path / "mlflow.db"
    (v1, run1), (v2, run2) = _versions(tracking, 2)
    assert champion_record.read_sqlite(database, NAME) == _record(None, None)
    for version, run_id in ((v1, run1), (v2, run2)):
        registry.promote(NAME, version)
        mlflow_says = champion_record.identity(NAME, registry.champion(NAME))
        assert mlflow_says == _record(version, run_id)
        assert champion_record.read_sqlite(database, NAME) == mlflow_says
        assert champion_record.current(tracking) == mlflow_says
    assert champion_record.read_sqlite(database, "other-model") == {
        "registered_model": "other-model",
        "version": None,
        "run_id": None,
    }
    MlflowClient().delete_registered_model_alias(NAME, registry.CHAMPION)
    assert champion_record.read_sqlite(database, NAME) == _record(None, None)
    registry.promote(NAME, v1)
    MlflowClient().delete_model_version(NAME, v1)  # deleting a version drops its alias
    assert champion_record.identity(NAME, registry.champion(NAME)) == _record(None, None)
    assert champion_record.read_sqlite(database, NAME) == _record(None, None)


def test_the_sql_read_is_for_the_installed_mlflow_schema_only(tracking, tmp_path):
    import sqlite3

    from mlflow.store.db.utils import _get_latest_schema_revision

    assert champion_record.SCHEMA_REVISION == _get_latest_schema_revision()
    ((v1, run1),) = _versions(tracking, 1)
    registry.promote(NAME, v1)
    database = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute("UPDATE alembic_version SET version_num = 'a-newer-one'")
    assert champion_record.read_sqlite(database, NAME) is None
    # So MLflow's client answers (its store, opened before the change, is cached here).
    assert champion_record.current(tracking) == _record(v1, run1)
    (tmp_path / "junk.db").write_bytes(b"not an SQLite database, and long enough to show it\n")
    assert champion_record.read_sqlite(tmp_path / "junk.db", NAME) is None
    assert champion_record.read_sqlite(tmp_path / "missing" / "mlflow.db", NAME) is None


@pytest.mark.parametrize("setting", ["MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_WORKSPACES"])
def test_a_registry_elsewhere_is_read_by_mlflow(tracking, tmp_path, monkeypatch, setting):
    ((v1, run1),) = _versions(tracking, 1)
    registry.promote(NAME, v1)
    monkeypatch.setenv(
        setting,
        f"sqlite:///{tmp_path / 'mlflow.db'}" if setting == "MLFLOW_REGISTRY_URI" else "false",
    )

    def refuse(*args):
        raise AssertionError("read with SQL although MLflow would look elsewhere")

    monkeypatch.setattr(champion_record, "read_sqlite", refuse)
    assert champion_record.current(tracking) == _record(v1, run1)


def test_a_broken_store_is_one_clear_error(tmp_path):
    from mnist_pipeline.errors import TrackingError

    (tmp_path / "mlflow.db").write_text("not an SQLite database, and long enough to show it\n")
    cfg = test_config.section("tracking", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="could not read the champion of 'mnist-classifier'"):
        champion_record.current(cfg)


def _run_stage(folder: Path) -> tuple[str, set[str]]:
    """The champion stage in `folder`: its stdout and the top-level modules it imported."""
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    stage_args = [
        "--config-dir",
        ".",
        "--config-name",
        "params",
        "hydra.run.dir=.",
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra/hydra_logging=disabled",
    ]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "pipelines/champion.py"), *stage_args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DVC_ROOT": str(folder)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "mnist_pipeline.tracking.champion_record" in imported
    return done.stdout, {name.split(".")[0] for name in imported}


def test_the_stage_loads_no_tensorflow_and_creates_no_store(tmp_path):
    stdout, imported = _run_stage(tmp_path)
    assert not imported & {"tensorflow", "keras", "mlflow"}
    assert stdout.startswith("champion: no champion of mnist-classifier")
    assert json.loads((tmp_path / "models/champion.json").read_text())["version"] is None
    assert not (tmp_path / "mlflow.db").exists()


def test_the_stage_reads_the_default_store_without_mlflow(tracking, tmp_path):
    ((v1, run1),) = _versions(tracking, 1)
    registry.promote(NAME, v1)
    stdout, imported = _run_stage(tmp_path)
    assert not imported & {"tensorflow", "keras", "mlflow", "sqlalchemy"}
    assert stdout.startswith(f"champion: {NAME} v{v1}, set since the last evaluate here")
    assert json.loads((tmp_path / "models/champion.json").read_text()) == _record(v1, run1)
