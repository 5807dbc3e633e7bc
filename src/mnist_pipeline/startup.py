"""What a process that loads TensorFlow sets before it does: called first by the train and
evaluate stages and by sweep workers, never on import, so a notebook importing this library
keeps its usual behaviour."""

from __future__ import annotations

import os
import sys

# Keras imports these at start-up whenever they are installed, only to offer wrappers no
# stage uses (scikit-learn is installed as an MLflow dependency): ~60 MB of every training
# process's peak memory. A process that needs one imports it before calling `prepare`.
UNUSED_BY_STAGES = ("sklearn",)


def prepare() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner quiet
    for name in UNUSED_BY_STAGES:
        sys.modules.setdefault(name, None)  # `import sklearn` now raises ImportError
