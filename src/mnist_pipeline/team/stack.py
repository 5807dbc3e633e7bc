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
`champion` reserved for the gate identity (`secure.py`, `release_gate.py`, `users.py`), and
starts the gate service that alone moves it (`gate_service.py`); PostgreSQL stays on
127.0.0.1 and asks every client for a password (kept in the stack's PGPASSFILE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import project
from ..errors import ServerError, reported
from ..files import write_json, write_text
from ..serve import process
from ..serve.ui import tracking_server_command
from ..tracking import locks
from .postgres import SUPERUSER, Cluster

DEFAULT_DIR = ".team"
DEFAULT_PORT = 5050  # the MLflow server (the local UI takes 5000, serving 5001)
DEFAULT_POSTGRES_PORT = 5433  # beside a system PostgreSQL on 5432
DATABASES = ("mlflow", "optuna", "monitoring", "mlflow_auth")
# Two uvicorn workers: parallel sweep workers and evaluations call the server at once.
SERVER_WORKERS = 2
LOCK_ENV = locks.LOCK_URL_ENV
MONITORING_ENV = "MNIST_MONITORING_LOG"  # monitoring.requestlog.LOG_ENV: the request log
PASSWORD_FILE_ENV = "PGPASSFILE"  # libpq's: where clients find the PostgreSQL password


@dataclass
class Stack:
    """Where the stack's parts are; saved as `stack.json` in its folder."""

    folder: str
    port: int
    postgres_port: int
    server_pid: int | None = None
    network: bool = False  # logins, roles and TLS; served on every interface
    gate_pid: int | None = None  # the gate service (network stacks): gate_service.py
    gate_port: int | None = None
    gate_test_sha256: str | None = None  # the test split the gate service is pinned to
    gate_note: str = ""  # why the gate service is not running, when it is not

    @property
    def gate_folder(self) -> Path:
        return self.secrets / "gate"

    @property
    def gate_log(self) -> Path:
        return self.root / "gate-service.log"

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
    def pgpass(self) -> Path:
        """The PostgreSQL password file of a stack with logins (PGPASSFILE)."""
        return self.secrets / "pgpass"

    @property
    def cluster(self) -> Cluster:
        password = None
        if self.network:  # every connection gives a password (scram-sha-256)
            from .secure import load_secrets

            password = load_secrets(self.secrets).postgres_password
        return Cluster(self.root / "postgres", self.postgres_port, password)

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
        trust = f"export MLFLOW_TRACKING_SERVER_CERT_PATH={self.ca}\n" if self.network else ""
        if self.network:  # the evaluate stage leaves the decision to the gate service
            from .users import GATE_SERVICE_ENV, GATE_WAIT_S

            trust += (
                f"export {GATE_SERVICE_ENV}={GATE_WAIT_S:g}\n"
                f"export {PASSWORD_FILE_ENV}={self.pgpass}\n"
            )
        return (
            f"export MLFLOW_TRACKING_URI={self.tracking_uri}\n{trust}"
            f"export {LOCK_ENV}={self.lock_url}\n"
            f"export {MONITORING_ENV}={self.request_log}\n"
        )


def load(folder: Path) -> Stack | None:
    try:
        saved = json.loads((folder / "stack.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise ServerError(
            f"{folder / 'stack.json'}: unreadable ({err}); remove it and run "
            "up again (the data stays)"
        ) from None
    return Stack(**saved)


def server_alive(stack: Stack) -> bool:
    return alive(stack.server_pid)


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:  # a child of this process that ended (a test's): reap it, it is gone
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(
    folder: Path, port: int, postgres_port: int, network: bool = False, checkout: Path | None = None
) -> tuple[Stack, float]:
    """Start PostgreSQL and the MLflow server (each only if not running); return the stack and
    the seconds it took. `network`: the MLflow server on every interface, with logins,
    roles and TLS (a stack started so stays so), and the gate service, which decides with
    `checkout`'s gate rules on a copy of its test data (default: this repository)."""
    started = time.monotonic()
    folder = folder.resolve()
    stack = load(folder) or Stack(str(folder), port, postgres_port, network=network)
    stack.folder = str(folder)
    if network and not stack.network:
        if server_alive(stack):
            raise ServerError(
                "the stack's MLflow server is running without logins: stop it "
                "first (make team-down), then make team-up ARGS=--network"
            )
        stack.network = True
    for directory in (stack.artifacts, stack.dvc_remote):
        directory.mkdir(parents=True, exist_ok=True)
    cluster = stack.cluster
    if not cluster.running():
        _check_free(stack.postgres_port, "--postgres-port")
    cluster.init()
    cluster.start()
    if stack.network:
        from . import secure

        cluster.require_passwords()
        secure.write_pgpass(stack.pgpass, stack.postgres_port, SUPERUSER, cluster.password or "")
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
    if stack.network:
        start_gate_service(stack, checkout or project.root())
    stack.save()
    return stack, time.monotonic() - started


@contextlib.contextmanager
def login(stack: Stack, credentials: dict[str, str]) -> Iterator[None]:
    """MLflow's client environment switched to `credentials` on the stack's server, and back."""
    keys = (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
    )
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({**credentials, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(stack.ca)})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_gate_service(stack: Stack, checkout: Path) -> None:
    """The gate's login, a pinned copy of `checkout`'s test data, the service, and the registry
    webhook that wakes it. Without test data in `checkout` the service is not started, and
    `stack.gate_note` says why."""
    from . import gate_service, secure, users

    made = secure.load_secrets(stack.secrets)
    with login(stack, made.admin_env):
        users.ensure(
            users.client(stack.tracking_uri), secure.GATE_LOGIN, "gate", made.gate_password
        )
    if alive(stack.gate_pid):
        return
    stack.gate_pid, stack.gate_note = None, ""
    settings = _gate_settings(stack, checkout)
    if isinstance(settings, str):
        stack.gate_note = settings
        return
    stack.gate_port = stack.gate_port or _free_port()
    config = stack.gate_folder / "service.json"
    write_text(
        config,
        json.dumps(
            asdict(
                gate_service.ServiceConfig(
                    port=stack.gate_port,
                    test_sha256=stack.gate_test_sha256 or "",
                    tracking_uri=stack.tracking_uri,
                    lock_url=stack.lock_url,
                    records=str(stack.gate_folder / "records"),
                    **settings,
                )
            ),
            indent=2,
        )
        + "\n",
        permissions=0o600,
    )
    command = process.ServerCommand(
        argv=[sys.executable, "-m", "mnist_pipeline.team.gate_service", str(config)],
        env_overrides={
            **made.gate_env,
            "MLFLOW_TRACKING_URI": stack.tracking_uri,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(stack.ca),
            PASSWORD_FILE_ENV: str(stack.pgpass),
        },
        url=f"http://127.0.0.1:{stack.gate_port}",
        ready_url=f"http://127.0.0.1:{stack.gate_port}/health",
    )
    with open(stack.gate_log, "ab") as log:
        service = process.start(command, log=log, cwd=stack.gate_folder)
    stack.gate_pid = service.pid
    stack.save()
    try:
        process.wait_until_ready(service, command.ready_url)
    except ServerError as err:
        raise ServerError(f"the gate service: {err}; see {stack.gate_log}") from None
    with login(stack, made.admin_env):
        _ensure_webhook(
            stack.tracking_uri, f"{command.url}{gate_service.WEBHOOK_PATH}", made.webhook_secret
        )


WEBHOOK_NAME = "mnist-gate-service"


def _ensure_webhook(tracking_uri: str, url: str, secret: str) -> None:
    """The registry webhook that tells the gate service a version was registered."""
    from mlflow import MlflowClient

    from . import gate_service

    client = MlflowClient(tracking_uri)
    found = [hook for hook in client.list_webhooks() if hook.name == WEBHOOK_NAME]
    if found:
        client.update_webhook(
            found[0].webhook_id,
            url=url,
            events=[gate_service.EVENT],
            secret=secret,
            status="ACTIVE",
        )
    else:
        client.create_webhook(
            WEBHOOK_NAME,
            url,
            [gate_service.EVENT],
            secret=secret,
            description="wakes the gate service (mnist-pipeline)",
        )


def _gate_settings(stack: Stack, checkout: Path) -> dict | str:
    """The service's rules and data from `checkout` (its params.yaml; the test split and suite
    copied once into the stack and pinned by hash), or why there are none."""
    import shutil

    import yaml

    from ..config import section
    from ..data.splits import load_split

    try:
        params = yaml.safe_load((checkout / "params.yaml").read_text(encoding="utf-8"))
        paths = section(params, "paths")
        settings = {
            "registered_model": section(params, "tracking").registered_model,
            "evaluate": section(params, "evaluate").model_dump(),
            "gate": section(params, "gate").model_dump(),
        }
    except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError) as err:
        return f"not started: {checkout / 'params.yaml'} is unreadable ({err})"
    data = stack.gate_folder / "data"
    if not (data / "processed" / "test.npz").is_file():
        test, suite = checkout / paths.processed / "test.npz", checkout / paths.corrupted
        if not (test.is_file() and suite.is_dir()):
            return (
                f"not started: no test data to pin in {checkout} ({test}, {suite}); run "
                "dvc repro corrupt there, then make team-up ARGS=--network again"
            )
        staging = stack.gate_folder / "data.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "processed").mkdir(parents=True)
        shutil.copyfile(test, staging / "processed" / "test.npz")
        shutil.copytree(suite, staging / "corrupted")
        os.replace(staging, data)
    if stack.gate_test_sha256 is None:
        stack.gate_test_sha256 = load_split(data / "processed", "test").sha256()
    return {**settings, "data": str(data)}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(stack: Stack) -> tuple[process.ServerCommand, str | None]:
    """The MLflow server's command, and the CA certificate that checks it (None: plain)."""
    if not stack.network:
        return tracking_server_command(
            stack.cluster.url("mlflow"),
            stack.artifacts,
            host="127.0.0.1",
            port=stack.port,
            workers=SERVER_WORKERS,
        ), None
    from . import secure

    hostname = socket.gethostname()
    plain = tracking_server_command(
        stack.cluster.url("mlflow"),
        stack.artifacts,
        host="0.0.0.0",
        port=stack.port,
        workers=SERVER_WORKERS,
        extra_hosts=(f"{hostname}:{stack.port}", hostname),
    )
    command, certs = secure.secured(
        plain,
        stack.secrets,
        auth_database=stack.cluster.url("mlflow_auth"),
        names=["127.0.0.1", "localhost", hostname],
    )
    command.env_overrides[PASSWORD_FILE_ENV] = str(stack.pgpass)
    return command, str(certs.ca)


def user(stack: Stack, action: str, name: str, role: str | None) -> str:
    """Add (with `role`) or remove a user of a `--network` stack; what to tell them."""
    if not stack.network:
        raise ServerError(
            "this stack has no logins: start it with make team-up ARGS=--network "
            "(after make team-down)"
        )
    if not server_alive(stack):
        raise ServerError("the stack's MLflow server is not running: make team-up")
    from . import secure, users

    if name == secure.GATE_LOGIN:
        raise ServerError(f"{name!r} is the gate service's own login: pick another name")
    with login(stack, secure.load_secrets(stack.secrets).admin_env):
        auth = users.client(stack.tracking_uri)
        if action == "remove":
            users.remove(auth, name)
            return f"team: removed {name}; their password no longer works\n"
        password = users.add(auth, name, role or "viewer")
    return (
        f"team: added {name} ({role}). Give them these lines (the password is shown only "
        f"now), and the CA certificate {stack.ca}:\n"
        + users.exports(stack.tracking_uri, str(stack.ca), name, password)
    )


def down(folder: Path) -> Stack | None:
    """Stop the MLflow server and PostgreSQL; the data, artifacts and remote stay."""
    stack = load(folder.resolve())
    if stack is None:
        return None
    _stop_group(stack.gate_pid)
    _stop_group(stack.server_pid)
    stack.gate_pid = stack.server_pid = None
    stack.cluster.stop()
    stack.save()
    return stack


def _stop_group(pid: int | None) -> None:
    """SIGTERM the process group `process.start` made for `pid`; SIGKILL it after 20 s."""
    if pid is None or not alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)


def _check_free(port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ServerError(
                f"port {port} on 127.0.0.1 is in use; pick another with {option} <port>"
            ) from None


def describe(stack: Stack) -> str:
    return (
        f"  MLflow server  {stack.tracking_uri}  (runs and registry in PostgreSQL; "
        f"artifacts uploaded through it to {stack.artifacts})\n"
        f"  PostgreSQL     {stack.cluster.url('')}  (databases {', '.join(DATABASES)}; "
        f"data in {stack.cluster.data})\n"
        f"  DVC remote     {stack.dvc_remote}\n"
        + (f"  gate service   {_gate_state(stack)}\n" if stack.network else "")
    )


def _gate_state(stack: Stack) -> str:
    if alive(stack.gate_pid):
        return (
            f"http://127.0.0.1:{stack.gate_port}/health, pinned to test set "
            f"{(stack.gate_test_sha256 or '?')[:12]}… (log: {stack.gate_log})"
        )
    return stack.gate_note or f"stopped (log: {stack.gate_log})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-pipeline team", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=("up", "down", "status", "env", "user"))
    parser.add_argument(
        "words", nargs="*", default=[], metavar="ARG", help="user: add NAME | remove NAME"
    )
    parser.add_argument(
        "--role",
        choices=("viewer", "member", "gate"),
        default="viewer",
        help="user add: what the user may do (default viewer)",
    )
    parser.add_argument(
        "--network",
        action="store_true",
        help="up: serve MLflow on every interface, with logins, roles and TLS",
    )
    parser.add_argument(
        "--dir", help=f"the stack's folder (default: <repository root>/{DEFAULT_DIR})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the MLflow server's port (first start only)"
    )
    parser.add_argument(
        "--postgres-port",
        type=int,
        default=DEFAULT_POSTGRES_PORT,
        help="PostgreSQL's port (first start only)",
    )
    args = parser.parse_args(argv)
    folder = Path(args.dir) if args.dir else project.root() / DEFAULT_DIR
    with reported("team"):
        if args.action == "user":
            if len(args.words) != 2 or args.words[0] not in ("add", "remove"):
                raise ServerError(
                    "usage: team user add NAME --role viewer|member|gate, or team user remove NAME"
                )
            stack = load(folder.resolve())
            if stack is None:
                raise ServerError(f"no team stack in {folder}: make team-up ARGS=--network")
            print(user(stack, args.words[0], args.words[1], args.role), end="")
        elif args.action == "up":
            stack, seconds = up(folder, args.port, args.postgres_port, network=args.network)
            print(
                f"team: up in {seconds:.1f} s\n{describe(stack)}"
                "Point each checkout at it (every clone, every shell):\n"
                + "".join(f"  {line}\n" for line in stack.exports().splitlines())
                + f"  dvc remote add --local -f -d team {stack.dvc_remote}\n"
                "One Bayesian study shared by every machine:\n"
                f"  python pipelines/sweep.py +sweep=mlp sweep.storage={stack.optuna_storage}"
            )
        elif args.action == "down":
            stack = down(folder)
            print(
                "team: nothing to stop"
                if stack is None
                else f"team: stopped (data kept in {stack.folder})"
            )
        else:
            stack = load(folder.resolve())
            if stack is None:
                raise ServerError(
                    f"no team stack in {folder}: start one with "
                    "python -m mnist_pipeline.team up (make team-up)"
                )
            if args.action == "env":
                print(stack.exports(), end="")
            else:
                state = "running" if server_alive(stack) and stack.cluster.running() else "stopped"
                print(f"team: {state}\n{describe(stack)}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
