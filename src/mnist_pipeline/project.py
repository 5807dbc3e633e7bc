"""Where the project lives: the repository root, also from inside a queued DVC experiment.

Queued experiments run in a temporary copy under `.dvc/tmp/exps/`; DVC sets `DVC_ROOT` to
the original repository, so shared state (the tracking store, locks) resolves there and
does not vanish with the copy.
"""

from __future__ import annotations

import os
from pathlib import Path

DVC_ROOT_ENV = "DVC_ROOT"


def root(start: str | os.PathLike[str] | None = None) -> Path:
    """The original repository root: `$DVC_ROOT` if set, else the nearest folder with `.dvc/`."""
    env = os.environ.get(DVC_ROOT_ENV)
    if env:
        return Path(env).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / "dvc.yaml").is_file():
            return folder
    return here


def experiment_params_hint() -> str | None:
    """Inside `dvc exp run` in the workspace (not a queued copy), when params.yaml differs from
    the committed one: the command that restores it. DVC writes `-S` values into the
    workspace's params.yaml and leaves them there when the experiment fails."""
    import subprocess

    root = os.environ.get(DVC_ROOT_ENV)
    if not os.environ.get("DVC_EXP_BASELINE_REV") or not root:
        return None
    if Path(root).resolve() != Path.cwd().resolve():
        return None  # a queued or temporary copy: the workspace was not touched
    try:
        done = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "params.yaml"],
            cwd=root,
            capture_output=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 1:
        return None
    return (
        "params.yaml keeps this experiment's -S values; the workspace's models, metrics "
        "and plots are as they were; restore the committed params with: "
        "git checkout -- params.yaml"
    )
