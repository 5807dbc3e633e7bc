"""A real team stack (PostgreSQL + MLflow server + DVC remote) for tests, and checkouts that
use it as separate machines would.

The stack lives in a folder under the system temp dir, not under pytest's own (which only
root can enter: PostgreSQL runs as the `postgres` user when the tests run as root), on free
loopback ports, and is stopped and removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from helpers.tiny_store import free_port
from mnist_pipeline.team import stack as team_stack


@contextlib.contextmanager
def running_stack(
    network: bool = False, checkout: Path | None = None
) -> Iterator[team_stack.Stack]:
    folder = Path(tempfile.mkdtemp(prefix="mnist-team-"))
    os.chmod(folder, 0o755)
    try:
        stack, _ = team_stack.up(
            folder / "stack", free_port(), free_port(), network=network, checkout=checkout
        )
        try:
            yield stack
        finally:
            team_stack.down(folder / "stack")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def client_env(stack: team_stack.Stack) -> dict[str, str]:
    """What a checkout exports to work against the stack (as `team env` prints it)."""
    return {
        "MLFLOW_TRACKING_URI": stack.tracking_uri,
        team_stack.LOCK_ENV: stack.lock_url,
        team_stack.MONITORING_ENV: stack.request_log,
        **({team_stack.PASSWORD_FILE_ENV: str(stack.pgpass)} if stack.network else {}),
    }
