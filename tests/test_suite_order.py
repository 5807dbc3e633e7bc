"""The order `make test` hands modules to its workers (tests/conftest.py) names real modules."""

from __future__ import annotations

from helpers.digits import ROOT
from helpers.suite_order import LONGEST_FIRST


def test_every_module_listed_to_run_first_exists():
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"tests/helpers/suite_order.py names modules that are gone: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
