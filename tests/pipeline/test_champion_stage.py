"""A second `dvc repro` is a no-op: evaluate reruns when the champion moved from outside,
not after its own decisions. Real DVC and MLflow in a throwaway repository."""

from __future__ import annotations

import json
import re

import pytest
from helpers import config as test_config
from helpers import repo

from mnist_pipeline.tracking import registry, store

pytestmark = pytest.mark.slow

NAME = "mnist-classifier"


def _repro(path) -> tuple[set[str], str]:
    """The stages `dvc repro` ran, and its output; checks that it skipped every other one."""
    out = repo.run(["dvc", "repro"], path).stdout
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    for stage in {"fetch", "preprocess", "train", "champion", "evaluate"} - ran:
        assert (
            f"Stage '{stage}' didn't change, skipping" in out or f"Stage '{stage}' is cached" in out
        ), out
    return ran, out


def _gate(path) -> dict:
    return json.loads((path / "gate.json").read_text())


def test_a_second_repro_runs_neither_train_nor_evaluate_until_the_champion_moves(tmp_path):
    """...nor after its own decisions: two passes in a row, then two rejections."""
    path = repo.make(
        tmp_path / "repo", gate={"min_accuracy": 0.0, "require_significance": False}, store=True
    )
    repo.set_params(path, "optimizer", learning_rate=0.001)  # a weak first champion...
    repo.set_params(path, "train", epochs=1)
    ran, out = _repro(path)
    assert ran == {"fetch", "preprocess", "corrupt", "train", "champion", "evaluate"}
    assert "gate: PASSED" in out and _gate(path)["champion_version"] == "1"
    repo.set_params(path, "optimizer", learning_rate=0.05)  # ...that the next model beats
    repo.set_params(path, "train", epochs=3)
    ran, out = _repro(path)
    assert ran == {"champion", "train", "evaluate"} and "gate: PASSED" in out, out
    assert (_gate(path)["champion_version_before"], _gate(path)["champion_version"]) == ("1", "2")

    ran, out = _repro(path)
    assert ran == {"champion"}
    assert "Stage 'train' didn't change, skipping" in out
    assert "Stage 'evaluate' didn't change, skipping" in out
    assert "champion: mnist-classifier v2, as the last evaluate left it" in out

    # Someone else moves the alias: another version of the same model becomes champion.
    store.use_store(test_config.section("tracking", uri=repo.store(path)))
    model_uri = json.loads((path / "models/run.json").read_text())["model_uri"]
    other = registry.register(model_uri, NAME, tags={})
    registry.promote(NAME, str(other.version))
    ran, out = _repro(path)
    assert ran == {"champion", "evaluate"}
    assert _gate(path)["champion_version_before"] == str(other.version)
    assert json.loads((path / "models/champion.json").read_text())["version"] == "3"

    ran, _ = _repro(path)
    assert ran == {"champion"}

    # Models no better than the champion, twice, under the default rules: rejected (a tie
    # never wins), and nothing is left to rerun after either.
    repo.set_params(path, "gate", require_significance=True)
    for seed in (7, 8):
        repo.set_params(path, "train", seed=seed)
        ran, out = _repro(path)
        assert ran == {"champion", "train", "evaluate"} and "gate: REJECTED" in out, out
    assert _gate(path)["champion_version"] == "3"

    ran, out = _repro(path)
    assert ran == {"champion"}, out
    assert "champion: mnist-classifier v3, as the last evaluate left it" in out
