"""Stage processes keep modules Keras would import but no stage uses out of memory."""

import subprocess
import sys

import pytest

PROBE = """
import sys
{prepare}
import keras  # imports scikit-learn at start-up when it is installed and not skipped
from mnist_pipeline.training import models
models.build_optimizer  # the library works as usual
print(type(sys.modules.get("sklearn")).__name__)
"""


@pytest.mark.parametrize("prepare, loaded", [
    ("from mnist_pipeline import startup; startup.prepare()", "NoneType"),
    ("import mnist_pipeline.training.models", "module"),  # importing the library alone changes nothing
])
def test_scikit_learn_is_skipped_only_by_stage_start_up(prepare, loaded):
    out = subprocess.run([sys.executable, "-c", PROBE.format(prepare=prepare)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == loaded
