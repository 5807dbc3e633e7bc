"""Exceptions for failures a user can act on.

Every expected failure (bad config, bad data, unreachable mirrors, a refused model) is
raised as a subclass of `PipelineError` with a one-line message that names what was wrong
and what to do. Stages print that line and exit non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "MNIST_PIPELINE_DEBUG"


class PipelineError(Exception):
    """An expected failure whose message tells the user what to do."""


class ConfigError(PipelineError, ValueError):
    """A config value is unknown, of the wrong type, or out of range."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config '{key}': got {value!r}, expected {allowed}")


class DataError(PipelineError):
    """A data file is missing, malformed, or fails verification."""


class FetchError(PipelineError):
    """No mirror could deliver a verified file."""


class ModelError(PipelineError):
    """A model file is refused or cannot be loaded."""


class TrainingError(PipelineError):
    """Training diverged or was stopped."""


@contextlib.contextmanager
def reported(stage: str) -> Iterator[None]:
    """Turn a `PipelineError` into one line on stderr and exit status 1.

    Set MNIST_PIPELINE_DEBUG=1 to get the full traceback instead.
    """
    try:
        yield
    except PipelineError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{stage}: error: {err}", file=sys.stderr)
        print(f"{stage}: (set {DEBUG_ENV}=1 for a traceback)", file=sys.stderr)
        raise SystemExit(1) from None
