"""Fixtures every test gets: the repository root, and no outside tracking store."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.digits import ROOT
from helpers.suite_order import LONGEST_FIRST


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    """Tests never write to a tracking server or store they did not create."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules of `helpers.suite_order.LONGEST_FIRST` first, in its order; the rest as
    collected."""
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
