"""TensorFlow's C++ start-up lines: the ones seen on this project's machines, and which of
them this machine's TensorFlow prints when nothing quiets it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from mnist_pipeline.errors import DEBUG_ENV

QUIETING = ("TF_CPP_MIN_LOG_LEVEL", DEBUG_ENV)  # what a test removes to see the default

STARTUP_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine, GPU will not be used.",
    "failed call to cuInit",
    "This TensorFlow binary is optimized to use available CPU instructions",
)


def found(text: str) -> list[str]:
    """The start-up lines that occur in `text`."""
    return [line for line in STARTUP_LINES if line in text]


def unquieted_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: ours) without the settings that quiet TensorFlow, plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in QUIETING}
    return {**env, **extra}


@functools.cache
def printed_here() -> tuple[str, ...]:
    """The start-up lines a bare `import tensorflow` prints on this machine."""
    done = subprocess.run(
        [sys.executable, "-c", "import tensorflow as tf; tf.constant(1) + 1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=unquieted_env(),
    )
    return tuple(found(done.stderr))
