"""The Model Registry: versions, their tags, and the `champion` alias."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from .store import retry

CHAMPION = "champion"
# A version's tag saying why a rollback took `champion` away from it (the gate refuses it).
WITHDRAWN = "champion.withdrawn"
# The digest of a version's files when the team's gate service approved them
# (files.tree_sha256); what serves it from the team server checks it.
APPROVED_DIGEST = "gate.sha256"
# Whether the gate found the version's int8 graph servable ("true"/"false"), and its figures:
# `make serve ARGS=--int8` serves only a version whose tag says "true". Under gate.*, so on a
# team server with logins only the gate may write them (team.release_gate).
INT8_SERVABLE = "gate.int8.servable"
INT8_PARITY = "gate.int8.parity"


# --- registry ------------------------------------------------------------------------------


def find_version(name: str, tag: str, value: str) -> Any | None:
    """The registered version of `name` whose tag `tag` equals `value`, if any.

    The store filters on the tag, so only the match comes back, not every version.
    """
    from mlflow import MlflowClient

    if "`" in tag:
        raise ValueError(f"registry tag {tag!r}: got a backtick, which a filter cannot quote")
    found = retry(
        lambda: MlflowClient().search_model_versions(
            f"name = {_quoted(name)} and tags.`{tag}` = {_quoted(value)}", max_results=1
        )
    )
    return found[0] if found else None


def versions(name: str, page_size: int = 200) -> list[Any]:
    """Every registered version of `name` ([] when it has none or does not exist)."""
    from mlflow import MlflowClient

    found: list[Any] = []
    token = None
    while True:

        def search(page_token: str | None = token) -> Any:
            return MlflowClient().search_model_versions(
                f"name = {_quoted(name)}", max_results=page_size, page_token=page_token
            )

        page = retry(search)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _quoted(value: str) -> str:
    """`value` as a string literal of MLflow's filter syntax, which has no escapes: it is
    taken verbatim between quotes of a kind it does not contain."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(
        f"registry filter value {value!r}: got both ' and \", which MLflow's "
        "filter syntax cannot quote"
    )


def register(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version of `name` (creating the model if needed)."""
    import mlflow

    return retry(lambda: mlflow.register_model(model_uri, name, tags=dict(tags)))


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        retry(functools.partial(client.set_model_version_tag, name, version, key, str(value)))


def delete_version_tag(name: str, version: str, key: str) -> None:
    """Remove tag `key` of a version (which has it)."""
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().delete_model_version_tag(name, version, key))


def version(name: str, number: str) -> Any | None:
    """Version `number` of `name`, or None when there is no such version (or model)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: MlflowClient().get_model_version(name, number))
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion(name: str) -> Any | None:
    """The version holding the `champion` alias, or None."""
    return by_alias(name, CHAMPION)


def by_alias(name: str, alias: str) -> Any | None:
    """The version of `name` holding `alias`, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: MlflowClient().get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if (
            "not found" in str(err).lower()
            or "RESOURCE_DOES_NOT_EXIST" in str(err)
            or "does not exist" in str(err).lower()
            or _refused_for_a_missing_model(err, name)
        ):
            return None
        raise


def _refused_for_a_missing_model(err: Exception, name: str) -> bool:
    """A server with logins answers 403, not 404, for a registered model that does not exist
    (there is nothing to hold a grant); a search, which it filters instead, tells them apart."""
    from mlflow import MlflowClient

    if getattr(err, "error_code", "") != "PERMISSION_DENIED" and "403" not in str(err):
        return False
    return not retry(
        lambda: MlflowClient().search_registered_models(f"name = {_quoted(name)}", max_results=1)
    )


def promote(name: str, version: str) -> None:
    import os

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ..errors import PromotionError

    try:
        retry(lambda: MlflowClient().set_registered_model_alias(name, CHAMPION, version))
    except MlflowException as err:
        if getattr(err, "error_code", "") != "PERMISSION_DENIED":
            raise
        login = os.environ.get("MLFLOW_TRACKING_USERNAME", "(none)")
        raise PromotionError(
            f"the tracking server refused to move '{CHAMPION}' of {name} for login {login!r}: "
            "on a team server with logins only the gate service's login moves it. To have the "
            "evaluate stage leave the decision to the service: export "
            "MNIST_PIPELINE_GATE_SERVICE=900; to roll back: run the command with the gate's "
            "login (docs/team.md)"
        ) from None


def label(version: str | None) -> str:
    """How a version is written for people: 'v3', or 'none'."""
    return f"v{version}" if version else "none"


def version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"
