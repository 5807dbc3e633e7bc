"""The team's MLflow server with logins, roles and TLS (what a server on a network needs).

`secured` turns the plain `mlflow server` command (`serve/ui.tracking_server_command`) into
one that runs MLflow's authentication app with the release gate (`--app-name mnist-auth`,
`release_gate.py`), workspaces on (so roles decide who may create anything), and TLS from the
stack's own CA (`pki.py`). Its secrets live in the stack's folder, mode 0600: the admin
password (shown once, by `team user add` for each member), the Flask secret key MLflow's CSRF
protection needs, and the auth settings. Users and roles: `users.py`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..files import write_text
from ..serve.process import ServerCommand
from . import pki, release_gate

ADMIN = "admin"
SECRETS_FILE = "secrets.json"
AUTH_CONFIG = "basic_auth.ini"
GRACEFUL_SHUTDOWN_S = 5  # how long a stopping server lets running requests finish


GATE_LOGIN = "gate"  # the gate service's login (release_gate.py's default gate user)
WEBHOOK_SECRET_ENV = "MNIST_GATE_WEBHOOK_SECRET"  # how the gate service gets the HMAC secret


@dataclass(frozen=True)
class Secrets:
    admin_password: str
    flask_secret_key: str
    gate_password: str = ""
    webhook_secret: str = ""  # signs the registry webhook's deliveries to the gate service
    webhook_key: str = ""  # the Fernet key MLflow encrypts stored webhook secrets with
    postgres_password: str = ""  # the stack's PostgreSQL superuser (scram-sha-256)

    @property
    def admin_env(self) -> dict[str, str]:
        """The admin's client credentials (for `team user add`)."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    @property
    def gate_env(self) -> dict[str, str]:
        """The gate service's client credentials, and the secret its deliveries are signed
        with."""
        return {
            "MLFLOW_TRACKING_USERNAME": GATE_LOGIN,
            "MLFLOW_TRACKING_PASSWORD": self.gate_password,
            WEBHOOK_SECRET_ENV: self.webhook_secret,
        }


def load_secrets(folder: Path) -> Secrets:
    """The stack's secrets, generated into `folder/secrets.json` (mode 0600) the first time
    (and any a stack made by an older version lacks, added)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / SECRETS_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    made = {
        "admin_password": secrets.token_urlsafe(18),
        "flask_secret_key": secrets.token_urlsafe(32),
        "gate_password": secrets.token_urlsafe(18),
        "webhook_secret": secrets.token_urlsafe(32),
        "webhook_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        "postgres_password": secrets.token_urlsafe(24),
    }
    if all(saved.get(key) for key in made):
        return Secrets(**saved)
    complete = Secrets(**{**made, **{k: v for k, v in saved.items() if v}})
    write_text(path, json.dumps(dataclasses.asdict(complete), indent=2) + "\n", permissions=0o600)
    return complete


def write_pgpass(path: Path, port: int, user: str, password: str) -> None:
    """A libpq password file (mode 0600, or libpq ignores it) for the stack's PostgreSQL:
    processes given `PGPASSFILE` connect with the password, which stays out of every URL,
    command line and log."""
    write_text(
        path,
        "".join(f"{host}:{port}:*:{user}:{password}\n" for host in ("127.0.0.1", "localhost")),
        permissions=0o600,
    )


def secured(
    command: ServerCommand, folder: Path, *, auth_database: str, names: list[str]
) -> tuple[ServerCommand, pki.Pki]:
    """`command` with logins, roles and TLS; the server certificate covers `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    made = load_secrets(folder)
    certs = pki.ensure(folder / "pki", names)
    config = folder / AUTH_CONFIG
    write_text(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {auth_database}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = "
        "mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n",
        permissions=0o600,
    )
    argv = [
        arg.replace("http://", "https://") if previous == "--cors-allowed-origins" else arg
        for previous, arg in zip(["", *command.argv[:-1]], command.argv, strict=True)
    ]
    argv = [
        *argv,
        "--app-name",
        "mnist-auth",
        "--enable-workspaces",
        "--uvicorn-opts",
        shlex.join(
            [
                *("--ssl-keyfile", str(certs.key), "--ssl-certfile", str(certs.cert)),
                # A client's idle TLS keep-alive connection would hold a stopping server
                # until it is killed (20 s later); requests still running get this long.
                *("--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)),
            ]
        ),
    ]
    env = {
        **command.env_overrides,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": made.admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": made.flask_secret_key,
        # Registry webhooks to the gate service: their secret is stored encrypted with
        # this key (the same in every worker and after restarts), and the service listens
        # on loopback over plain HTTP, which MLflow's SSRF guard refuses unless allowed.
        # Only an admin may create a webhook.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": made.webhook_key,
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        release_gate.GATE_USERS_ENV: GATE_LOGIN,
    }
    url = command.url.replace("http://", "https://", 1)
    return dataclasses.replace(
        command,
        argv=argv,
        env_overrides=env,
        url=url,
        ready_url=command.ready_url.replace("http://", "https://", 1),
    ), certs
