"""Where a run came from: the git commit and dirty flag, the DVC experiment, the hashes DVC
recorded.

Plain subprocess and file reads; the tracking module turns these into MLflow tags.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def git_state(cwd: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """`git.dirty`: whether tracked files in `cwd` differ from the commit checked out; empty
    outside a git repository or before its first commit. The commit itself is MLflow's tag
    `mlflow.source.git.commit` (see `runs.run`); MLflow keeps no dirty flag."""
    dirty = git_dirty(cwd, git_commit(cwd))
    return {} if dirty is None else {"git.dirty": str(dirty).lower()}


def git_dirty(cwd: str | os.PathLike[str] | None, commit: str | None) -> bool | None:
    """Whether tracked files in `cwd` differ from `commit`, the commit checked out there
    (`git_commit`); None when there is none or git cannot tell."""
    if commit is None:
        return None
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out in `cwd`, or None outside a git repository."""
    return _git(cwd, "rev-parse", "HEAD")


def _git(cwd: str | os.PathLike[str] | None, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def dvc_experiment() -> dict[str, str]:
    """The DVC experiment name and baseline, when running inside `dvc exp run`."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    return tags


def dvc_lock_hashes(lock_file: str | os.PathLike[str], paths: list[str]) -> dict[str, str]:
    """`dvc.dep.<path>` -> the md5 DVC recorded in `dvc.lock` for each of `paths`.

    A stage's inputs are the outputs of the stages before it, which `dvc repro` has already
    locked when this stage runs, so their hashes are final.
    """
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    found: dict[str, str] = {}
    wanted = {str(Path(p)) for p in paths}
    for stage in (lock.get("stages") or {}).values():
        for entry in (stage.get("outs") or []) + (stage.get("deps") or []):
            path = str(Path(entry.get("path", "")))
            if path in wanted and entry.get("md5") and f"dvc.dep.{path}" not in found:
                found[f"dvc.dep.{path}"] = entry["md5"]
    return found
