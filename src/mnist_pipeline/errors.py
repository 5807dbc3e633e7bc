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


class MirrorError(FetchError):
    """One mirror could not deliver one file; the message is the short reason why."""


class TrainingError(PipelineError):
    """Training diverged or was stopped."""


class TrackingError(PipelineError):
    """The tracking store cannot be reached or opened."""


class PromotionError(PipelineError):
    """A move of the champion by hand was refused (nothing changed)."""


class ReviewError(PipelineError):
    """The review report could not be written (DVC or git could not compare the revisions)."""


class ServerError(PipelineError):
    """A server could not be configured, started, or did not become ready."""


class ImageError(PipelineError):
    """A file is not a readable picture of a digit."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception, so the run ends KILLED instead of staying RUNNING."""


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
        from .project import experiment_params_hint

        hint = experiment_params_hint()
        if hint:
            print(f"{stage}: {hint}", file=sys.stderr)
        raise SystemExit(1) from None

def describe_error(err: object) -> str:
    """A short, one-line description of an exception or URLError reason."""
    if isinstance(err, OSError) and err.strerror:
        text = f"[Errno {err.errno}] {err.strerror}" if err.errno is not None else err.strerror
        if err.filename:
            text += f": {err.filename}"
    else:
        text = str(err) or type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."
