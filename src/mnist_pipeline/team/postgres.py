"""A PostgreSQL cluster in a folder of its own, on a loopback port: Debian's binaries, run
as the `postgres` user when this process is root (PostgreSQL refuses to run as root).

`Cluster.init` runs `initdb` (trust authentication for connections from this machine only,
superuser `mlflow`), `start`/`stop` run `pg_ctl`, and `create_databases` makes the
databases the team stack uses. `require_passwords` (a stack with logins) sets the
superuser's password and replaces every `trust` rule with `scram-sha-256`. The cluster
listens on 127.0.0.1 and on a Unix socket inside its folder; nothing outside this machine
can reach it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ServerError
from ..files import write_text

SUPERUSER = "mlflow"
SERVICE_USER = "postgres"
# Debian installs the server binaries off PATH, one folder per major version.
BINARY_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
START_TIMEOUT_S = 60
# pg_hba.conf of a cluster that asks every client for a password (`require_passwords`).
HBA_PASSWORDS = """# written by mnist-pipeline: a password for every connection, no trust
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


def binaries() -> Path:
    """The folder holding `initdb` and `pg_ctl`: PATH first, then Debian's layout."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        (
            Path(p)
            for pattern in BINARY_GLOBS
            for p in glob.glob(pattern)
            if (Path(p) / "initdb").is_file()
        ),
        reverse=True,
    )
    if not candidates:
        raise ServerError(
            "PostgreSQL's initdb was not found: install the server "
            "(Debian: apt-get install postgresql) or put its bin/ on PATH"
        )
    return candidates[0]


@dataclass(frozen=True)
class Cluster:
    """One PostgreSQL data folder served on 127.0.0.1:`port`."""

    folder: Path
    port: int
    # The superuser's password, once `require_passwords` made the cluster ask for one (clients
    # find it in the stack's PGPASSFILE, so it is in no URL and no command line).
    password: str | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def initialised(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def init(self) -> None:
        """Create the data folder with `initdb` (once)."""
        if self.initialised():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        _hand_over(self.folder)
        _run(
            [
                str(binaries() / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-sync",
            ],
            f"initdb in {self.data}",
        )

    def running(self) -> bool:
        done = subprocess.run(
            _as_service([str(binaries() / "pg_ctl"), "-D", str(self.data), "status"]),
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode == 0

    def start(self) -> None:
        if self.running():
            return
        options = (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        _run(
            [
                str(binaries() / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.log),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ],
            f"pg_ctl start on port {self.port} (log: {self.log})",
        )

    def stop(self, mode: str = "fast") -> None:
        if not self.initialised() or not self.running():
            return
        _run(
            [str(binaries() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            "pg_ctl stop",
        )

    def connect(self, database: str = "postgres") -> Any:
        """An autocommit connection as the superuser, once the cluster accepts one."""
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        password: dict[str, Any] = {"password": self.password} if self.password else {}
        while True:
            try:
                return psycopg.connect(
                    self.url(database), autocommit=True, connect_timeout=5, **password
                )
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"PostgreSQL on port {self.port} does not accept "
                        f"connections: {str(err).strip()}"
                    ) from None
                time.sleep(0.2)

    def require_passwords(self) -> None:
        """Every connection, over TCP or the socket, must give a password (scram-sha-256):
        the superuser's is set to `password` and pg_hba.conf keeps no `trust` rule."""
        from psycopg import sql

        if not self.password:
            raise ServerError("require_passwords: the cluster has no password to set")
        with self.connect() as connection:
            connection.execute("SET password_encryption = 'scram-sha-256'")
            connection.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(self.password)
                )
            )
        rules = self.data / "pg_hba.conf"
        write_text(rules, HBA_PASSWORDS, permissions=0o600)
        _hand_over(rules)
        _run([str(binaries() / "pg_ctl"), "-D", str(self.data), "reload"], "pg_ctl reload")

    def create_databases(self, names: tuple[str, ...]) -> None:
        """Create each database in `names` that does not exist yet."""
        connection = self.connect()
        with connection:
            existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in existing:
                    connection.execute(f'CREATE DATABASE "{name}"')


def _as_service(argv: list[str]) -> list[str]:
    """`argv` run as the `postgres` user when this process is root."""
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", SERVICE_USER, "--", *argv]


def _hand_over(folder: Path) -> None:
    """As root, give the cluster's folder (or one file) to `postgres`, and check it can reach
    it."""
    if os.geteuid() != 0:
        return
    try:
        account = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise ServerError(
            f"running as root, PostgreSQL must run as the '{SERVICE_USER}' "
            "user, which does not exist: install Debian's postgresql package "
            "or run as an ordinary user"
        ) from None
    for path in [folder, *(folder.rglob("*") if folder.is_dir() else ())]:
        os.chown(path, account.pw_uid, account.pw_gid)
    if not folder.is_dir():
        return  # a file inside a cluster folder already handed over
    for parent in folder.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ServerError(
                f"{parent} is not searchable by other users, so the "
                f"'{SERVICE_USER}' user cannot reach {folder}; choose a folder "
                "elsewhere (--dir) or chmod o+x it"
            )


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(_as_service(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ServerError(f"{what} failed: {detail[-1] if detail else f'exit {done.returncode}'}")
