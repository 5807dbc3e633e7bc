"""Locks that serialise read-decide-write sequences on shared state (the registry's champion,
a sweep's parent run).

Two kinds, chosen by a URL:
- none (the embedded default): a file lock under `<repository root>/.locks/`, which every
  process of this checkout (queued experiments included) sees, and no other machine does;
- `postgresql://...` (a team): a PostgreSQL advisory lock on that database, which every
  machine connected to it sees. PostgreSQL holds it for the connection, so a holder that
  dies (even by SIGKILL) releases it at once; a holder that loses the connection while it
  still works finds out through `Held.check` before it writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .. import project
from ..errors import TrackingError, describe_error

LOCK_DIR = ".locks"
LOCK_URL_ENV = "MNIST_PIPELINE_LOCK_URL"
WAIT_S = 600.0
CONNECT_TIMEOUT_S = 10
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def lock_url(configured: str | None) -> str | None:
    """`MNIST_PIPELINE_LOCK_URL` if set, else the configured URL (`tracking.lock_url`)."""
    url = os.environ.get(LOCK_URL_ENV) or configured
    if url and not url.startswith(POSTGRES_SCHEMES):
        raise TrackingError(
            f"lock URL {url!r}: expected postgresql://user@host:port/database "
            f"(set {LOCK_URL_ENV} or tracking.lock_url), or nothing for a file "
            "lock in this checkout"
        )
    return url or None


class Held:
    """A lock being held; `check` raises `TrackingError` if it may have been lost."""

    def __init__(self, description: str, connection: object | None = None) -> None:
        self.description = description
        self._connection = connection

    def check(self) -> None:
        """Before a write that relies on the lock: fail if the lock's connection is gone
        (PostgreSQL released the lock with it, so another holder may be in)."""
        if self._connection is None:
            return
        import psycopg

        try:
            self._connection.execute("SELECT 1")  # type: ignore[attr-defined]
        except psycopg.Error as err:
            raise TrackingError(
                f"lost {self.description} ({describe_error(err)}): nothing was "
                "changed after that; rerun the stage"
            ) from None


@contextlib.contextmanager
def held(name: str, url: str | None, *, wait_s: float = WAIT_S) -> Iterator[Held]:
    """Hold the lock `name` (a file lock, or an advisory lock on the database at `url`)."""
    if url is None:
        folder = project.root() / LOCK_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"{name}.lock"
        try:
            with FileLock(str(path), timeout=wait_s):
                yield Held(f"the file lock {path}")
        except Timeout:
            raise TrackingError(
                f"the file lock {path} was not free within {wait_s:.0f} s"
            ) from None
        return
    with _advisory(name, url, wait_s) as lock:
        yield lock


@contextlib.contextmanager
def _advisory(name: str, url: str, wait_s: float) -> Iterator[Held]:
    import psycopg

    key = f"mnist-pipeline:{name}"
    where = public_url(url)
    try:
        connection = psycopg.connect(
            _libpq(url), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        )
    except psycopg.Error as err:
        raise TrackingError(
            f"cannot reach the lock database {where}: {describe_error(err)} "
            f"(check {LOCK_URL_ENV} / tracking.lock_url)"
        ) from None
    description = f"the advisory lock '{name}' on {where}"
    try:
        with connection:
            try:
                # lock_timeout bounds the wait for the advisory lock too.
                connection.execute(f"SET lock_timeout = '{int(wait_s * 1000)}ms'")
                connection.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
            except psycopg.errors.LockNotAvailable:
                raise TrackingError(f"{description} was not free within {wait_s:.0f} s") from None
            except psycopg.Error as err:
                raise TrackingError(f"cannot take {description}: {describe_error(err)}") from None
            yield Held(description, connection)
            with contextlib.suppress(psycopg.Error):  # closing the connection frees it too
                connection.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
    finally:
        connection.close()


def _libpq(url: str) -> str:
    """A URL libpq accepts (SQLAlchemy's `postgresql+psycopg://` names the driver)."""
    return "postgresql://" + url.split("://", 1)[1]


def public_url(url: str) -> str:
    """`url` without a password."""
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url
