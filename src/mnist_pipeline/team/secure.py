"""The team's MLflow server with logins, roles and TLS (what a server on a network needs).

`secured` turns the plain `mlflow server` command (`serve/ui.tracking_server_command`) into
one that runs MLflow's authentication app with the release gate (`--app-name mnist-auth`,
`release_gate.py`), workspaces on (so roles decide who may create anything), and TLS from the
stack's own CA (`pki.py`). Its secrets live in the stack's folder, mode 0600: the admin
password (shown once, by `team user add` for each member), the Flask secret key MLflow's CSRF
protection needs, and the auth settings. Users and roles: `users.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..files import write_text
from ..serve.process import ServerCommand
from . import pki

ADMIN = "admin"
SECRETS_FILE = "secrets.json"
AUTH_CONFIG = "basic_auth.ini"


@dataclass(frozen=True)
class Secrets:
    admin_password: str
    flask_secret_key: str

    @property
    def admin_env(self) -> dict[str, str]:
        """The admin's client credentials (for `team user add`)."""
        return {"MLFLOW_TRACKING_USERNAME": ADMIN,
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


def load_secrets(folder: Path) -> Secrets:
    """The stack's secrets, generated into `folder/secrets.json` (mode 0600) the first time."""
    path = folder / SECRETS_FILE
    if path.is_file():
        return Secrets(**json.loads(path.read_text(encoding="utf-8")))
    made = Secrets(admin_password=secrets.token_urlsafe(18),
                   flask_secret_key=secrets.token_urlsafe(32))
    write_text(path, json.dumps(dataclasses.asdict(made), indent=2) + "\n", permissions=0o600)
    return made


def secured(command: ServerCommand, folder: Path, *, auth_database: str,
            names: list[str]) -> tuple[ServerCommand, pki.Pki]:
    """`command` with logins, roles and TLS; the server certificate covers `names`."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    made = load_secrets(folder)
    certs = pki.ensure(folder / "pki", names)
    config = folder / AUTH_CONFIG
    write_text(config, "[mlflow]\n"
                       "default_permission = NO_PERMISSIONS\n"
                       f"database_uri = {auth_database}\n"
                       f"admin_username = {ADMIN}\n"
                       "authorization_function = "
                       "mlflow.server.auth:authenticate_request_basic_auth\n"
                       "grant_default_workspace_access = false\n", permissions=0o600)
    argv = [arg.replace("http://", "https://") if previous == "--cors-allowed-origins" else arg
            for previous, arg in zip(["", *command.argv[:-1]], command.argv, strict=True)]
    argv = [*argv, "--app-name", "mnist-auth", "--enable-workspaces",
            "--uvicorn-opts", shlex.join(["--ssl-keyfile", str(certs.key),
                                          "--ssl-certfile", str(certs.cert)])]
    env = {**command.env_overrides, "MLFLOW_AUTH_CONFIG_PATH": str(config),
           "MLFLOW_AUTH_ADMIN_PASSWORD": made.admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": made.flask_secret_key}
    url = command.url.replace("http://", "https://", 1)
    return dataclasses.replace(
        command, argv=argv, env_overrides=env, url=url,
        ready_url=command.ready_url.replace("http://", "https://", 1)), certs

