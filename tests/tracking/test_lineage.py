"""Where a run came from: MLflow's commit tag, our fallback for it, and the dirty flag."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import repo

from mnist_pipeline.tracking import lineage, runs

# Starts a run in this process and one in a spawned child, as the sweep starts its workers.
ENTRY = """
import multiprocessing
import sys

import mlflow

from mnist_pipeline.tracking import runs


def start(name):
    with runs.run(mlflow.set_experiment("lineage").experiment_id, run_name=name):
        pass


if __name__ == "__main__":
    start("main")
    worker = multiprocessing.get_context("spawn").Process(target=start, args=("worker",))
    worker.start()
    worker.join()
    sys.exit(worker.exitcode)
"""


@pytest.fixture()
def project(tmp_path) -> Path:
    """A git repository holding the entry point, committed."""
    path = tmp_path / "project"
    path.mkdir()
    (path / "entry.py").write_text(ENTRY)
    repo.run(["git", "init", "-q", "-b", "main"], path)
    repo.run(["git", "add", "-A"], path)
    repo.run(["git", "commit", "-qm", "entry"], path)
    return path


def _commits(cwd: Path, store: Path, *command: str) -> dict[str, str | None]:
    """Run `command` in `cwd` against `store`; the commit tag of each run, by run name."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    repo.run([sys.executable, *command], cwd, MLFLOW_TRACKING_URI=uri)
    found = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("lineage").experiment_id]
    )
    return {r.info.run_name: r.data.tags.get(runs.GIT_COMMIT) for r in found}


def _head(path: Path) -> str:
    return repo.run(["git", "rev-parse", "HEAD"], path).stdout.strip()


@pytest.mark.slow
def test_mlflow_tags_the_entry_points_commit_in_the_process_and_its_spawned_workers(
    project, tmp_path
):
    # Run from a folder outside any repository: only MLflow, which looks at the entry point,
    # can know the commit (the fallback looks at the working directory).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    commits = _commits(elsewhere, tmp_path / "mlflow.db", str(project / "entry.py"))
    assert commits == {"main": _head(project), "worker": _head(project)}


@pytest.mark.slow
def test_where_mlflow_finds_no_commit_the_working_directorys_is_recorded(project, tmp_path):
    # `python -c` has no entry point file, like pytest run from a virtual environment.
    code = "import runpy; runpy.run_path('entry.py', run_name='__main__')"
    assert _commits(project, tmp_path / "a.db", "-c", code) == {
        "main": _head(project),
        "worker": _head(project),
    }
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "entry.py").write_text(ENTRY)
    assert _commits(outside, tmp_path / "b.db", "-c", code) == {"main": None, "worker": None}


def test_dirty_flag_follows_tracked_files_only(project, tmp_path):
    assert lineage.git_state(project) == {"git.dirty": "false"}
    (project / "notes.txt").write_text("untracked")
    assert lineage.git_state(project) == {"git.dirty": "false"}
    (project / "entry.py").write_text(ENTRY + "\n# edited\n")
    assert lineage.git_state(project) == {"git.dirty": "true"}
    assert lineage.git_commit(project) == _head(project)

    assert lineage.git_state(tmp_path) == {} and lineage.git_commit(tmp_path) is None
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    repo.run(["git", "init", "-q"], fresh)
    assert lineage.git_state(fresh) == {}, "no commit yet: nothing to differ from"
