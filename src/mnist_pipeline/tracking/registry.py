"""The Model Registry: versions, their tags, and the `champion` alias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .store import retry

CHAMPION = "champion"


# --- registry ------------------------------------------------------------------------------

def find_version(name: str, tag: str, value: str) -> Any | None:
    """The registered version of `name` whose tag `tag` equals `value`, if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        versions = retry(lambda: client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(tag) == value:
            return version
    return None


def register(model_uri: str, name: str, tags: Mapping[str, str]) -> Any:
    """Register `model_uri` as a new version of `name` (creating the model if needed)."""
    import mlflow

    return retry(lambda: mlflow.register_model(model_uri, name, tags=dict(tags)))


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        retry(lambda k=key, v=value: client.set_model_version_tag(name, version, k, str(v)))


def champion(name: str) -> Any | None:
    """The version holding the `champion` alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: MlflowClient().get_model_version_by_alias(name, CHAMPION))
    except MlflowException as err:
        if "not found" in str(err).lower() or "RESOURCE_DOES_NOT_EXIST" in str(err) \
                or "does not exist" in str(err).lower():
            return None
        raise


def promote(name: str, version: str) -> None:
    from mlflow import MlflowClient

    retry(lambda: MlflowClient().set_registered_model_alias(name, CHAMPION, version))


def version_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"
