"""The team stack on one machine: PostgreSQL, an MLflow tracking server on it, a DVC remote.

    python -m mnist_pipeline.team up      # make team-up: start (or restart) everything
    python -m mnist_pipeline.team env     # the exports a checkout needs, for eval "$(...)"
    python -m mnist_pipeline.team status
    python -m mnist_pipeline.team down    # make team-down: stop the servers, keep the data
    python -m mnist_pipeline.team up --network            # logins, roles, TLS (secure.py)
    python -m mnist_pipeline.team user add NAME --role viewer|member|gate
    python -m mnist_pipeline.team user remove NAME

Everything lives in one folder (`.team/` at the repository root by default): the PostgreSQL
cluster (databases `mlflow` for runs and the registry, `optuna` for shared studies), the
artifacts the MLflow server stores for its clients (`--artifacts-destination`: clients
upload through the server, `mlflow-artifacts:` URIs, no shared disk), a folder that serves as
the DVC remote, the server log, and `stack.json` (ports and process ids). The servers bind
127.0.0.1: nothing outside this machine can reach them. `up --network` serves MLflow on
every interface instead, with MLflow's logins and roles, TLS from the stack's own CA, and
`champion` reserved for the gate identity (`secure.py`, `release_gate.py`, `users.py`);
PostgreSQL stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import project
from ..errors import ServerError, reported
from ..files import write_json
from ..serve import process
from ..serve.ui import tracking_server_command
from .postgres import Cluster

DEFAULT_DIR = ".team"
DEFAULT_PORT = 5050           # the MLflow server (the local UI takes 5000, serving 5001)
DEFAULT_POSTGRES_PORT = 5433  # beside a system PostgreSQL on 5432
DATABASES = ("mlflow", "optuna", "monitoring", "mlflow_auth")
# Two uvicorn workers: parallel sweep workers and evaluations call the server at once.
SERVER_WORKERS = 2
LOCK_ENV = "MNIST_PIPELINE_LOCK_URL"
MONITORING_ENV = "MNIST_MONITORING_LOG"  # monitoring.requestlog.LOG_ENV: the request log


@dataclass
class Stack:
    """Where the stack's parts are; saved as `stack.json` in its folder."""

    folder: str
    port: int
    postgres_port: int
    server_pid: int | None = None
    network: bool = False  # logins, roles and TLS; served on every interface

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def ca(self) -> Path:
        return self.secrets / "pki" / "ca.pem"

    @property
    def root(self) -> Path:
        return Path(self.folder)

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.root / "postgres", self.postgres_port)

    @property
    def tracking_uri(self) -> str:
        return f"{'https' if self.network else 'http'}://127.0.0.1:{self.port}"

    @property
    def lock_url(self) -> str:
        return self.cluster.url("mlflow")

    @property
    def optuna_storage(self) -> str:
        return self.cluster.url("optuna")

    @property
    def request_log(self) -> str:
        return self.cluster.url("monitoring")

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def dvc_remote(self) -> Path:
        return self.root / "dvc-remote"

    @property
    def server_log(self) -> Path:
        return self.root / "mlflow-server.log"

    def save(self) -> None:
        write_json(self.root / "stack.json", asdict(self))

    def exports(self) -> str:
        trust = (f"export MLFLOW_TRACKING_SERVER_CERT_PATH={self.ca}\n" if self.network
                 else "")
        return (f"export MLFLOW_TRACKING_URI={self.tracking_uri}\n{trust}"
                f"export {LOCK_ENV}={self.lock_url}\n"
                f"export {MONITORING_ENV}={self.request_log}\n")


def load(folder: Path) -> Stack | None:
    try:
        saved = json.loads((folder / "stack.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise ServerError(f"{folder / 'stack.json'}: unreadable ({err}); remove it and run "
                          "up again (the data stays)") from None
    return Stack(**saved)


def server_alive(stack: Stack) -> bool:
    if not stack.server_pid:
        return False
    try:
        os.kill(stack.server_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(folder: Path, port: int, postgres_port: int,
       network: bool = False) -> tuple[Stack, float]:
    """Start PostgreSQL and the MLflow server (each only if not running); return the stack and
    the seconds it took. `network`: the MLflow server on every interface, with logins,
    roles and TLS (a stack started so stays so)."""
    started = time.monotonic()
    folder = folder.resolve()
    stack = load(folder) or Stack(str(folder), port, postgres_port, network=network)
    stack.folder = str(folder)
    if network and not stack.network:
        if server_alive(stack):
            raise ServerError("the stack's MLflow server is running without logins: stop it "
                              "first (make team-down), then make team-up ARGS=--network")
        stack.network = True
    for directory in (stack.artifacts, stack.dvc_remote):
        directory.mkdir(parents=True, exist_ok=True)
    cluster = stack.cluster
    if not cluster.running():
        _check_free(stack.postgres_port, "--postgres-port")
    cluster.init()
    cluster.start()
    cluster.create_databases(DATABASES)
    if not server_alive(stack):
        _check_free(stack.port, "--port")
        command, ca = server_command(stack)
        with open(stack.server_log, "ab") as log:
            server = process.start(command, log=log)
        stack.server_pid = server.pid
        stack.save()
        try:
            process.wait_until_ready(server, command.ready_url, cafile=ca)
        except ServerError as err:
            raise ServerError(f"{err}; see {stack.server_log}") from None
    stack.save()
    return stack, time.monotonic() - started


def server_command(stack: Stack) -> tuple[process.ServerCommand, str | None]:
    """The MLflow server's command, and the CA certificate that checks it (None: plain)."""
    if not stack.network:
        return tracking_server_command(stack.cluster.url("mlflow"), stack.artifacts,
                                       host="127.0.0.1", port=stack.port,
                                       workers=SERVER_WORKERS), None
    from . import secure

    hostname = socket.gethostname()
    plain = tracking_server_command(
        stack.cluster.url("mlflow"), stack.artifacts, host="0.0.0.0", port=stack.port,
        workers=SERVER_WORKERS, extra_hosts=(f"{hostname}:{stack.port}", hostname))
    command, certs = secure.secured(plain, stack.secrets,
                                    auth_database=stack.cluster.url("mlflow_auth"),
                                    names=["127.0.0.1", "localhost", hostname])
    return command, str(certs.ca)


def user(stack: Stack, action: str, name: str, role: str | None) -> str:
    """Add (with `role`) or remove a user of a `--network` stack; what to tell them."""
    if not stack.network:
        raise ServerError("this stack has no logins: start it with make team-up ARGS=--network "
                          "(after make team-down)")
    if not server_alive(stack):
        raise ServerError("the stack's MLflow server is not running: make team-up")
    from . import secure, users

    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME",
                                                  "MLFLOW_TRACKING_PASSWORD",
                                                  "MLFLOW_TRACKING_SERVER_CERT_PATH")}
    os.environ.update({**secure.load_secrets(stack.secrets).admin_env,
                       "MLFLOW_TRACKING_SERVER_CERT_PATH": str(stack.ca)})
    try:
        auth = users.client(stack.tracking_uri)
        if action == "remove":
            users.remove(auth, name)
            return f"team: removed {name}; their password no longer works\n"
        password = users.add(auth, name, role or "viewer")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return (f"team: added {name} ({role}). Give them these lines (the password is shown only "
            f"now), and the CA certificate {stack.ca}:\n"
            + users.exports(stack.tracking_uri, str(stack.ca), name, password))


def down(folder: Path) -> Stack | None:
    """Stop the MLflow server and PostgreSQL; the data, artifacts and remote stay."""
    stack = load(folder.resolve())
    if stack is None:
        return None
    if server_alive(stack):
        try:
            os.killpg(stack.server_pid, signal.SIGTERM)  # the group `process.start` made
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while server_alive(stack) and time.monotonic() < deadline:
            time.sleep(0.2)
        if server_alive(stack):
            os.killpg(stack.server_pid, signal.SIGKILL)
    stack.server_pid = None
    stack.cluster.stop()
    stack.save()
    return stack


def _check_free(port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ServerError(f"port {port} on 127.0.0.1 is in use; pick another with "
                              f"{option} <port>") from None


def describe(stack: Stack) -> str:
    return (f"  MLflow server  {stack.tracking_uri}  (runs and registry in PostgreSQL; "
            f"artifacts uploaded through it to {stack.artifacts})\n"
            f"  PostgreSQL     {stack.cluster.url('')}  (databases {', '.join(DATABASES)}; "
            f"data in {stack.cluster.data})\n"
            f"  DVC remote     {stack.dvc_remote}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_pipeline.team",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status", "env", "user"))
    parser.add_argument("words", nargs="*", metavar="ARG",
                        help="user: add NAME | remove NAME")
    parser.add_argument("--role", choices=("viewer", "member", "gate"), default="viewer",
                        help="user add: what the user may do (default viewer)")
    parser.add_argument("--network", action="store_true",
                        help="up: serve MLflow on every interface, with logins, roles and TLS")
    parser.add_argument("--dir", help=f"the stack's folder (default: <repository root>/"
                                      f"{DEFAULT_DIR})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="the MLflow server's port (first start only)")
    parser.add_argument("--postgres-port", type=int, default=DEFAULT_POSTGRES_PORT,
                        help="PostgreSQL's port (first start only)")
    args = parser.parse_args(argv)
    folder = Path(args.dir) if args.dir else project.root() / DEFAULT_DIR
    with reported("team"):
        if args.action == "user":
            if len(args.words) != 2 or args.words[0] not in ("add", "remove"):
                raise ServerError("usage: team user add NAME --role viewer|member|gate, or "
                                  "team user remove NAME")
            stack = load(folder.resolve())
            if stack is None:
                raise ServerError(f"no team stack in {folder}: make team-up ARGS=--network")
            print(user(stack, args.words[0], args.words[1], args.role), end="")
        elif args.action == "up":
            stack, seconds = up(folder, args.port, args.postgres_port, network=args.network)
            print(f"team: up in {seconds:.1f} s\n{describe(stack)}"
                  "Point each checkout at it (every clone, every shell):\n"
                  + "".join(f"  {line}\n" for line in stack.exports().splitlines())
                  + f"  dvc remote add --local -f -d team {stack.dvc_remote}\n"
                  "One Bayesian study shared by every machine:\n"
                  f"  python pipelines/sweep.py +sweep=mlp sweep.storage={stack.optuna_storage}")
        elif args.action == "down":
            stack = down(folder)
            print("team: nothing to stop" if stack is None
                  else f"team: stopped (data kept in {stack.folder})")
        else:
            stack = load(folder.resolve())
            if stack is None:
                raise ServerError(f"no team stack in {folder}: start one with "
                                  "python -m mnist_pipeline.team up (make team-up)")
            if args.action == "env":
                print(stack.exports(), end="")
            else:
                state = ("running" if server_alive(stack) and stack.cluster.running()
                         else "stopped")
                print(f"team: {state}\n{describe(stack)}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
