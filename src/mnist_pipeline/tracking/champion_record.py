"""The champion record: a small JSON file through which DVC sees the registry's `champion`.

The evaluate stage's verdict depends on the champion, which lives in the tracking store
where DVC cannot look. The `champion` stage (always run, fast: no TensorFlow) writes this
record and evaluate lists it as a dependency, so evaluate reruns when the champion moved
and is skipped when it did not.

The record must not change when the only move since evaluate ran is evaluate's own (a
passing candidate becomes champion): otherwise every `dvc repro` after a pass would run
evaluate again. So evaluate copies the record it ran with into gate.json
(`champion_record`) next to the champion it left (`champion_version`), and:

- the registry's champion is the one evaluate left: the record stays what evaluate ran
  with, whatever evaluate decided;
- anything else (another experiment promoted, a person moved the alias, a new store, no
  gate.json yet): the record is the registry's champion now, so evaluate runs.

In effect the record names the champion as last set by anything but this workspace's own
evaluate. Reading never creates a store: a missing SQLite store has no champion.

The stage runs on every `dvc repro` and `dvc exp run`, so reading is quick: the default
SQLite store is read with plain SQL (~0.1 s), where MLflow's client needs ~2.5 s to import
and open a store. The SQL is used only on the schema it was written for (MLflow's schema
revision, checked on each read) and only where MLflow would read the registry from that
same database in its default workspace; any other store, schema or setting goes through
MLflow's client.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrackingConfig
from ..errors import TrackingError
from . import registry, store

Record = dict[str, Any]


def identity(name: str, version: Any | None) -> Record:
    """What the record says about `version` of `name` (None: no champion)."""
    return {
        "registered_model": name,
        "version": None if version is None else str(version.version),
        "run_id": None if version is None else version.run_id,
    }


def current(cfg: TrackingConfig) -> Record:
    """The registry's champion now, read without creating a store."""
    name = cfg.registered_model
    uri = store.tracking_uri(cfg)
    if store.not_created(uri):
        return identity(name, None)
    database = store.sqlite_file(uri)
    if database is not None and not any(os.environ.get(key) for key in ELSEWHERE_ENV):
        found = read_sqlite(database, name)
        if found is not None:
            return found
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # a SQLite file that is not a store

    try:
        store.use_store(cfg)
        return identity(name, registry.champion(name))
    except (MlflowException, SQLAlchemyError, OSError) as err:
        raise TrackingError(
            f"tracking store {uri}: could not read the champion of '{name}': "
            f"{str(err).splitlines()[0][:300]}"
        ) from None


# The MLflow schema revision (alembic head) the query below was written for: MLflow 3.17.2's.
# On any other revision, `read_sqlite` declines and MLflow's client reads the store.
SCHEMA_REVISION = "dc11669786a5"
DEFAULT_WORKSPACE = "default"  # what MLflow's SQL store files every row under
# Settings under which MLflow reads the registry elsewhere (another store, another workspace).
ELSEWHERE_ENV = ("MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_WORKSPACES", "MLFLOW_WORKSPACE")
_CHAMPION_QUERY = """
    SELECT v.version, v.run_id FROM registered_model_aliases AS a
    JOIN model_versions AS v ON v.workspace = a.workspace AND v.name = a.name
                             AND v.version = a.version
    WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != 'Deleted_Internal'
"""


@dataclass(frozen=True)
class _Version:
    version: str
    run_id: str | None


def read_sqlite(database: Path, name: str) -> Record | None:
    """The champion of `name` in the SQLite store `database`, read with plain SQL, as
    MLflow's `get_model_version_by_alias` would give it; None when this cannot be trusted
    (another schema revision, or anything unexpected): the caller then asks MLflow."""
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        with contextlib.closing(connection):
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
            if revision != [(SCHEMA_REVISION,)]:
                return None
            rows = connection.execute(
                _CHAMPION_QUERY, (DEFAULT_WORKSPACE, name, registry.CHAMPION)
            ).fetchall()
    except (sqlite3.Error, OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
        return None
    if len(rows) > 1:
        return None
    return identity(name, _Version(str(rows[0][0]), rows[0][1]) if rows else None)


def read(path: str | os.PathLike[str]) -> Record | None:
    """A JSON object from `path`, or None when it is missing or not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Decision:
    record: Record  # what the file must hold
    champion: Record  # the registry's champion now
    left_by_evaluate: bool  # the champion is the one the last evaluate left

    def line(self, path: str | os.PathLike[str]) -> str:
        """The stage's summary line."""
        if self.left_by_evaluate:
            return (
                f"champion: {describe(self.champion)}, as the last evaluate left it; "
                f"wrote {path} as that evaluate saw it"
            )
        return (
            f"champion: {describe(self.champion)}, set since the last evaluate here (or "
            f"none ran yet); wrote {path}"
        )


def decide(cfg: TrackingConfig, gate_path: str | os.PathLike[str]) -> Decision:
    """The record to write: the one the last evaluate ran with (from its gate.json) while
    the champion is still the one that evaluate left, else the champion now."""
    now = current(cfg)
    gate = read(gate_path) or {}
    ran_with = gate.get("champion_record")
    if (
        isinstance(ran_with, dict)
        and gate.get("registered_model") == now["registered_model"]
        and ran_with.get("registered_model") == now["registered_model"]
        and gate.get("champion_version") == now["version"]
    ):
        return Decision(record=ran_with, champion=now, left_by_evaluate=True)
    return Decision(record=now, champion=now, left_by_evaluate=False)


def describe(record: Record) -> str:
    name, version = record.get("registered_model"), record.get("version")
    return f"{name} v{version}" if version else f"no champion of {name}"
