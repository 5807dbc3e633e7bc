"""MLflow's authentication app, with `champion` reserved for the gate identity.

MLflow's permission model guards "set an alias" with the same permission as "register a
model version" (EDIT on the registered model), so anyone who may register a candidate may
also point `@champion` at it. This module is an MLflow app plugin (entry point
`mlflow.app: mnist-auth`, `mlflow server --app-name mnist-auth`): it builds MLflow's own
basic-auth app and adds one Flask `before_request` hook, which runs after MLflow has
authenticated the caller and checked its permissions, and refuses with 403 to anyone but the
gate identity:

- setting or deleting a protected alias (`champion` by default) on any registered model, by
  every route Flask dispatches to the alias handlers (the REST API and the UI's ajax API
  alike: the hook matches the handler, not the URL);
- renaming or deleting a registered model that carries a protected alias, and deleting the
  version a protected alias points at (both would move or drop it indirectly);
- writing tags whose key starts with `gate.` (the gate's verdict and digest on a version) or
  `champion.` (the promotion history on a model, a rollback's withdrawal of a version).

The server's environment configures it: MNIST_AUTH_GATE_USERS (default `gate`),
MNIST_AUTH_PROTECTED_ALIASES (default `champion`). Admins are not exempt: the gate's decision
is the only way to move the alias. Password checks that passed are remembered
(`credentials.py`): scrypt runs once per member's password, not on every request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

GATE_USERS_ENV = "MNIST_AUTH_GATE_USERS"
PROTECTED_ENV = "MNIST_AUTH_PROTECTED_ALIASES"
# The gate's verdict and digest on a version (gate.*), the promotion history on a model and a
# rollback's withdrawal of a version (champion.*).
RESERVED_TAG_PREFIXES = ("gate.", "champion.")

_ALIAS = {"_set_registered_model_alias", "_delete_registered_model_alias"}
_MODEL = {"_rename_registered_model", "_delete_registered_model"}
_VERSION_DELETE = "_delete_model_version"
_TAGS = {
    "_set_model_version_tag",
    "_delete_model_version_tag",
    "_set_registered_model_tag",
    "_delete_registered_model_tag",
}
_CREATE_WITH_TAGS = {"_create_model_version", "_create_registered_model"}
_LOOKUP_FAILED = {"<registry lookup failed>": "*"}

_logger = logging.getLogger(__name__)


def _names(env: str, default: str) -> frozenset[str]:
    return frozenset(
        part.strip() for part in os.environ.get(env, default).split(",") if part.strip()
    )


def _deny(message: str) -> Any:
    from flask import make_response

    response = make_response(
        json.dumps({"error_code": "PERMISSION_DENIED", "message": message}), 403
    )
    response.mimetype = "application/json"
    return response


def _body() -> dict:
    from flask import request

    body = request.get_json(silent=True)
    if isinstance(body, str):  # double-encoded JSON, which MLflow's handlers accept
        try:
            body = json.loads(body)
        except ValueError:
            body = None
    return body if isinstance(body, dict) else {}


def _values(field: str) -> set[str]:
    """Every value `field` has in this request: query string and JSON body (MLflow reads one
    or the other by method, so both are checked)."""
    from flask import request

    values = {value for value in request.args.getlist(field) if isinstance(value, str)}
    body = _body()
    if isinstance(body.get(field), (str, int)):
        values.add(str(body[field]))
    return values


def _tag_keys() -> set[str]:
    tags = _body().get("tags")
    if not isinstance(tags, list):
        return set()
    return {tag["key"] for tag in tags if isinstance(tag, dict) and isinstance(tag.get("key"), str)}


def _protected_on(name: str, protected: frozenset[str]) -> dict[str, str]:
    """The protected aliases registered model `name` carries, with their versions as text ({}
    if it does not exist); a failed lookup counts as protected (closed, not open)."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.handlers import _get_model_registry_store

    try:
        model = _get_model_registry_store().get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        _logger.exception("release gate: registry lookup failed for %r", name)
        return _LOOKUP_FAILED
    except Exception:  # noqa: BLE001 - any failure keeps the alias closed
        _logger.exception("release gate: registry lookup failed for %r", name)
        return _LOOKUP_FAILED
    return {
        alias: str(version)
        for alias, version in (model.aliases or {}).items()
        if alias.casefold() in protected
    }


def gate_hook(gate_users: frozenset[str], protected: frozenset[str]) -> Callable[[], Any]:
    """The before_request hook (None lets the request through)."""
    from flask import g, request

    def release_gate() -> Any:
        endpoint = request.endpoint
        if request.method not in ("POST", "DELETE", "PATCH") or endpoint not in (
            _ALIAS | _MODEL | _TAGS | _CREATE_WITH_TAGS | {_VERSION_DELETE}
        ):
            return None
        user = g.get("mlflow_authenticated_user")  # set by MLflow's auth hook, which ran first
        if not user:
            return _deny("release gate: the request is not authenticated")
        if user in gate_users:
            return None
        if endpoint in _TAGS or endpoint in _CREATE_WITH_TAGS:
            reserved = sorted(
                key
                for key in _values("key") | _tag_keys()
                if key.casefold().startswith(RESERVED_TAG_PREFIXES)
            )
            if reserved:
                return _deny(
                    f"tags {reserved} are written by the gate only; user {user!r} may "
                    "not write them"
                )
            return None
        if endpoint in _ALIAS:
            aliases = _values("alias")
            hit = sorted(alias for alias in aliases if alias.casefold() in protected)
            if hit or not aliases:
                _logger.warning(
                    "release gate: refused %s of alias %s to user %s",
                    request.method,
                    hit or "(none given)",
                    user,
                )
                return _deny(
                    f"only the gate ({', '.join(sorted(gate_users))}) moves the alias "
                    f"{hit or sorted(protected)}: a candidate becomes champion by "
                    f"passing the gate; user {user!r} may not set or delete it"
                )
            return None
        names = _values("name")
        if endpoint in _MODEL:
            for name in sorted(names):
                carried = _protected_on(name, protected)
                if carried:
                    return _deny(
                        f"registered model {name!r} carries {sorted(carried)}: only "
                        "the gate may rename or delete it"
                    )
            return None
        versions = _values("version")
        for name in sorted(names):
            carried = _protected_on(name, protected)
            if carried is _LOOKUP_FAILED or versions & set(carried.values()):
                return _deny(
                    f"{sorted(carried)} of {name!r} points at version "
                    f"{', '.join(sorted(versions))}: only the gate may delete it"
                )
        return None

    return release_gate


def create_app(app: Any = None) -> Any:
    """`mlflow server --app-name mnist-auth`: MLflow's basic-auth app plus the release gate."""
    from mlflow.server import app as mlflow_app
    from mlflow.server import auth
    from mlflow.server.auth import create_app as basic_auth

    from .credentials import remember_passed_checks

    flask_app = app if app is not None else mlflow_app
    served = basic_auth(flask_app)  # registers authentication first
    remember_passed_checks(auth.store)  # one scrypt check per login, not per request
    gate_users = _names(GATE_USERS_ENV, "gate")
    protected = frozenset(a.casefold() for a in _names(PROTECTED_ENV, "champion"))
    flask_app.before_request(gate_hook(gate_users, protected))
    _logger.warning("release gate: only %s may move %s", sorted(gate_users), sorted(protected))
    return served
