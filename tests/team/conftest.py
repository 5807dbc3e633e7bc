"""One real team stack (PostgreSQL + MLflow server) per test module of this folder."""

import pytest
from helpers import team


@pytest.fixture(scope="module")
def team_stack():
    with team.running_stack() as stack:
        yield stack
