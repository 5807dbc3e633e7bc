"""Where a model version's served artifacts are on this machine: the folder with `model.onnx`
and `calibration.json` that `mnist_onnx.OnnxDigitModel` loads.

The model server and `mnist-predict` answer without TensorFlow or MLflow; only finding the
folder needs the registry. In the default SQLite store that is one SQL query (the version's
storage location is a local folder already), as the champion stage reads the champion
(`champion_record`): no MLflow import, so a picture is answered in about a second. Any other
store (the team server) goes through MLflow's client, which downloads the model once into
`cache`, and checks the files against the digest the team's gate service approved, when it
approved them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..config import TrackingConfig
from ..errors import ModelError
from ..files import tree_sha256
from . import champion_record, store
from .mnist_onnx import INT8_FILE, ONNX_FILE

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")

_VERSION_QUERY = """
    SELECT v.version, v.storage_location FROM model_versions AS v
    WHERE v.workspace = ? AND v.name = ? AND v.version = ? AND v.current_stage != 'Deleted_Internal'
"""
_ALIAS_QUERY = """
    SELECT v.version, v.storage_location FROM registered_model_aliases AS a
    JOIN model_versions AS v ON v.workspace = a.workspace AND v.name = a.name
                             AND v.version = a.version
    WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != 'Deleted_Internal'
"""

_TAGS_QUERY = """
    SELECT t.key, t.value FROM model_version_tags AS t
    WHERE t.workspace = ? AND t.name = ? AND t.version = ?
"""


@dataclass(frozen=True)
class Served:
    folder: Path  # holds model.onnx and calibration.json (and model.int8.onnx, if made)
    name: str  # registered model
    version: str


def locate(cfg: TrackingConfig, model_uri: str, cache: str | os.PathLike[str]) -> Served:
    """The served artifacts of `model_uri` (`models:/<name>@<alias>` or
    `models:/<name>/<version>`), downloaded into `cache` when they are not on this disk."""
    match = MODEL_URI.match(model_uri)
    if match is None:
        raise ModelError(
            f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    name = match["name"]
    found = _from_sqlite(cfg, model_uri, name, match["alias"], match["version"])
    if found is None:
        found = _from_mlflow(cfg, model_uri, name, match["alias"], match["version"], cache)
    if not (found.folder / ONNX_FILE).exists():
        raise ModelError(
            f"{model_uri}: version {found.version} of '{name}' was logged "
            "before models were exported to ONNX: retrain it (dvc repro), or "
            "serve it with MLflow's own server (--mlflow)"
        )
    return found


def missing(name: str, alias: str | None, version: str | None, model_uri: str) -> str:
    return (
        f"{model_uri}: no version of '{name}' is '{alias}' yet"
        if alias
        else f"{model_uri}: '{name}' has no version {version}"
    )


def _from_sqlite(
    cfg: TrackingConfig, model_uri: str, name: str, alias: str | None, version: str | None
) -> Served | None:
    """The version's local artifacts, read with plain SQL where MLflow would read this same
    SQLite file (as champion_record decides); None when it cannot be trusted."""
    query, key = (_ALIAS_QUERY, alias) if alias else (_VERSION_QUERY, version)
    rows = _sqlite_rows(cfg, query, (name, key))
    if rows is None:
        return None
    if not rows:
        raise ModelError(missing(name, alias, version, model_uri))
    if len(rows) != 1 or not str(rows[0][1] or "").startswith("file:"):
        return None
    folder = Path(unquote(urlparse(rows[0][1]).path))
    return Served(folder=folder / "artifacts", name=name, version=str(rows[0][0]))


def _sqlite_rows(cfg: TrackingConfig, query: str, parameters: tuple[Any, ...]) -> list | None:
    """`query`'s rows (its first parameter: the workspace, then `parameters`) from the
    default SQLite store, read-only; None where MLflow must be asked instead (another store,
    another schema, the store unreadable)."""
    database = store.sqlite_file(store.tracking_uri(cfg))
    if database is None or any(os.environ.get(key) for key in champion_record.ELSEWHERE_ENV):
        return None
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        with contextlib.closing(connection):
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
            if revision != [(champion_record.SCHEMA_REVISION,)]:
                return None
            return connection.execute(
                query, (champion_record.DEFAULT_WORKSPACE, *parameters)
            ).fetchall()
    except (sqlite3.Error, OSError, ValueError, RuntimeError):
        return None


def _from_mlflow(
    cfg: TrackingConfig,
    model_uri: str,
    name: str,
    alias: str | None,
    number: str | None,
    cache: str | os.PathLike[str],
) -> Served:
    import mlflow
    from mlflow.exceptions import MlflowException

    from . import registry

    store.use_store(cfg)
    version = registry.by_alias(name, alias) if alias else registry.version(name, str(number))
    if version is None:
        raise ModelError(missing(name, alias, number, model_uri))
    try:
        folder = store.retry(
            lambda: mlflow.artifacts.download_artifacts(
                registry.version_uri(name, str(version.version)), dst_path=str(cache)
            )
        )
    except MlflowException as err:
        raise ModelError(f"{model_uri}: {str(err).splitlines()[0]}") from None
    approved = (version.tags or {}).get(registry.APPROVED_DIGEST)
    if approved:  # the team's gate service approved these files: are they still those?
        found = tree_sha256(folder)
        if found != approved:
            raise ModelError(
                f"{model_uri}: version {version.version}'s files are not the ones the gate "
                f"approved (sha256 {found[:12]}…, {registry.APPROVED_DIGEST} {approved[:12]}…):"
                " its artifacts were rewritten after approval; refusing to serve them (roll "
                "back to another version, and find who wrote to the artifact store)"
            )
    return Served(folder=Path(folder) / "artifacts", name=name, version=str(version.version))


def require_int8_servable(cfg: TrackingConfig, served: Served, model_uri: str) -> None:
    """ModelError unless `served` has an int8 graph the gate found servable (its version's
    `registry.INT8_SERVABLE` tag, written with the verdict, says "true")."""
    from . import registry

    if not (served.folder / INT8_FILE).is_file():
        raise ModelError(
            f"{model_uri}: version {served.version} of '{served.name}' has no int8 graph (it "
            "was trained before they were made, or its graph could not be quantized): serve "
            "its float32 graph (leave out --int8), or retrain it (dvc repro)"
        )
    rows = _sqlite_rows(cfg, _TAGS_QUERY, (served.name, served.version))
    if rows is not None:  # the default SQLite store: no MLflow import, as for the folder
        tags = {str(key): str(value) for key, value in rows}
    else:
        store.use_store(cfg)
        version = registry.version(served.name, served.version)
        tags = (version.tags or {}) if version is not None else {}
    if tags.get(registry.INT8_SERVABLE) != "true":
        why = tags.get(registry.INT8_PARITY) or (
            "the gate has not measured it yet (run the evaluate stage: dvc repro)"
        )
        raise ModelError(
            f"{model_uri}: version {served.version}'s int8 graph is not servable: {why}; "
            "serve its float32 graph (leave out --int8)"
        )
