"""An empty MLflow tracking store on SQLite, its schema already at the installed MLflow's head.

MLflow builds a new SQLite store by running every schema migration (1.7 s on an idle 2-core
machine, 3-4 s while the suite runs); opening a migrated one takes 0.06 s. So the tests that
need an empty store of their own get a copy of one built once per test process. The copy
holds no experiment: MLflow adds its Default experiment when it first opens it, as it does
in a store it has just built, and the experiments the pipeline creates get the same ids.
The path where MLflow builds the store itself is still tested: the queued grid of
`tests/pipeline/test_pipeline.py` runs on a repository without a copy, as a user's first run is.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import sqlite3
import tempfile
from pathlib import Path


def place(path: Path) -> str:
    """Copy the empty store to `path` (its folder must exist); returns its tracking URI."""
    shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"


@functools.cache
def _template() -> Path:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="empty-mlflow-store-"))
    atexit.register(shutil.rmtree, folder, True)
    database = folder / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{database}", str(folder / "artifacts"))
    store.engine.dispose()
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("delete from experiment_tags")
        conn.execute("delete from experiments")  # the Default one, pointing in `folder`
    return database
