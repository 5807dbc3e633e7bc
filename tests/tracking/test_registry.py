"""The Model Registry on a real SQLite store: finding a version by its tag."""

from __future__ import annotations

import pytest
from helpers import config as test_config
from helpers import empty_store

from mnist_pipeline.tracking.registry import find_version
from mnist_pipeline.tracking.store import use_store

NAME = "mnist-classifier"


@pytest.fixture()
def register(tmp_path, monkeypatch):
    """Registers a version of a model with the given tags; returns its number."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store.place(tmp_path / "mlflow.db"))
    # As the evaluate stage does: MLflow's process-wide URI, which an earlier test may have
    # set, would otherwise win over the environment.
    use_store(test_config.section("tracking"))
    client = MlflowClient()

    def version(name: str, **tags: str) -> str:
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        return str(client.create_model_version(name, source=str(tmp_path), tags=tags).version)

    return version


def _found(tag: str, value: str) -> str | None:
    version = find_version(NAME, tag, value)
    return None if version is None else str(version.version)


def test_the_version_with_the_tag_value_is_found_and_a_missing_value_gives_none(register):
    assert _found("model_sha256", "a" * 64) is None, "nothing registered yet"
    assert register(NAME, model_sha256="a" * 64) == "1"
    assert register(NAME, model_sha256="b" * 64) == "2"
    register("another-model", model_sha256="c" * 64)
    assert _found("model_sha256", "b" * 64) == "2"
    assert _found("model_sha256", "a" * 64) == "1"
    assert _found("model_sha256", "d" * 64) is None
    assert _found("model_sha256", "c" * 64) is None, "another model's version"
    assert _found("run_id", "a" * 64) is None, "another tag"


def test_values_with_quotes_or_wildcards_are_matched_verbatim(register):
    register(NAME, note="it's")
    register(NAME, note='say "hi"')
    register(NAME, note="%")
    assert _found("note", "it's") == "1"
    assert _found("note", 'say "hi"') == "2"
    assert _found("note", "%") == "3"
    assert _found("note", "it") is None
    with pytest.raises(ValueError, match="both ' and \""):
        find_version(NAME, "note", 'it\'s "both"')
