"""Fixtures every test gets: the repository root, and no outside tracking store."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.digits import ROOT


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _no_outside_tracking(monkeypatch):
    """Tests never write to a tracking server or store they did not create."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
