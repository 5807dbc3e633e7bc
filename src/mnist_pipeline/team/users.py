"""Team members on an authenticated MLflow server (`--app-name mnist-auth`), by role.

Three roles, as MLflow 3.17 role grants in the server's default workspace (the server runs
with `--enable-workspaces`, so a user with no role there can do nothing, and only members may
create experiments and models):

| role | experiments | registered models | what it is for |
|---|---|---|---|
| viewer | READ | READ | look at runs, models and the UI |
| member | EDIT | EDIT | log runs, register versions, run sweeps (and create experiments) |
| gate | READ | MANAGE | the gate: re-score candidates, move `champion`, write its history |

MANAGE is what deleting an alias needs; `release_gate.py` reserves `champion` for the gate
identity whatever the grants say. The calls go through MLflow's own auth client, as the
server's admin.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..errors import ServerError

WORKSPACE = "default"
ROLES: dict[str, list[tuple[str, str, str]]] = {
    "viewer": [("experiment", "*", "READ"), ("registered_model", "*", "READ")],
    "member": [
        ("workspace", "*", "USE"),
        ("experiment", "*", "EDIT"),
        ("registered_model", "*", "EDIT"),
    ],
    "gate": [("experiment", "*", "READ"), ("registered_model", "*", "MANAGE")],
}
# evaluation.promotion.GATE_SERVICE_ENV: how long a member's evaluate waits for the verdict
# (a CNN's scoring on the full test set and suite takes a minute or two on 2 cores).
GATE_SERVICE_ENV = "MNIST_PIPELINE_GATE_SERVICE"
GATE_WAIT_S = 900
PASSWORD_BYTES = 18  # 24 characters of URL-safe base64; MLflow wants at least 12


def client(tracking_uri: str) -> Any:
    """MLflow's auth client for the server; credentials and CA from the MLFLOW_* environment."""
    from mlflow.server import get_app_client

    return get_app_client("mnist-auth", tracking_uri=tracking_uri)


def ensure_roles(auth: Any) -> dict[str, int]:
    """The three roles in the default workspace (created once); their ids by name."""
    existing = {role.name: role.id for role in auth.list_roles(WORKSPACE)}
    for name, grants in ROLES.items():
        if name in existing:
            continue
        role = auth.create_role(WORKSPACE, name, description=f"mnist-pipeline {name}")
        for resource, pattern, permission in grants:
            auth.add_role_permission(role.id, resource, pattern, permission)
        existing[name] = role.id
    return existing


def add(auth: Any, name: str, role: str) -> str:
    """Create user `name` with `role`; returns the generated password (shown once)."""
    if role not in ROLES:
        raise ServerError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    roles = ensure_roles(auth)
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    try:
        auth.create_user(name, password)
    except Exception as err:  # noqa: BLE001 - MLflow's RestException: say what it said
        raise ServerError(f"team user add {name}: {str(err).splitlines()[0][:300]}") from None
    auth.assign_role(name, roles[role])
    return password


def ensure(auth: Any, name: str, role: str, password: str) -> None:
    """User `name` with `role` and `password`, created or given that password (the stack's
    own logins, such as the gate service's, whose passwords live in its secrets)."""
    roles = ensure_roles(auth)
    try:
        auth.get_user(name)
    except Exception:  # noqa: BLE001 - MLflow's RestException: no such user yet
        auth.create_user(name, password)
    else:
        auth.update_user_password(name, password)
    if role not in {assigned.name for assigned in auth.list_user_roles(name)}:
        auth.assign_role(name, roles[role])


def remove(auth: Any, name: str) -> None:
    """Delete user `name`: its password stops working at once."""
    try:
        auth.delete_user(name)
    except Exception as err:  # noqa: BLE001
        raise ServerError(f"team user remove {name}: {str(err).splitlines()[0][:300]}") from None


def exports(tracking_uri: str, ca: str, name: str, password: str) -> str:
    """What the user puts in their shell to work against the server (the evaluate stage then
    leaves the decision to the gate service and waits up to GATE_WAIT_S for it)."""
    return (
        f"export MLFLOW_TRACKING_URI={tracking_uri}\n"
        f"export MLFLOW_TRACKING_SERVER_CERT_PATH={ca}\n"
        f"export MLFLOW_TRACKING_USERNAME={name}\n"
        f"export MLFLOW_TRACKING_PASSWORD={password}\n"
        f"export {GATE_SERVICE_ENV}={GATE_WAIT_S:g}\n"
    )
