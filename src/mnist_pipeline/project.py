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
