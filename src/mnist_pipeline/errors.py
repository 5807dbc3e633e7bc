"""Exceptions for failures a user can act on.

Every expected failure (bad config, bad data, unreachable mirrors, a refused model) is
raised as a subclass of `PipelineError` with a one-line message that names what was wrong
and what to do. Stages print that line and exit non-zero; anything else is a bug and keeps
its traceback. `interruptible` turns SIGINT and SIGTERM into `Interrupted`, so a run or a
sweep ends as KILLED instead of staying RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

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


@contextlib.contextmanager
def interruptible() -> Iterator[Callable[[], None]]:
    """SIGINT and SIGTERM raise `Interrupted`, so runs end KILLED, not RUNNING.

    Yields `raise_pending`, which raises again for a signal already received. A signal can
    land while Python runs a finaliser (TensorFlow tears down each epoch's input iterator in
    one, at the epoch boundary); an exception raised there is printed and dropped and
    training would go on, so training calls `raise_pending` after every group of steps.
    A signal that lands inside a write to the tracking store, or while TensorFlow builds
    the exception of a failed op, is only recorded, so that code is never cut in two;
    `raise_pending` raises it right after. SIGINT is left alone where it is ignored (sweep
    workers, `nohup`).
    """
    received: list[int] = []

    def raise_pending() -> None:
        if received:
            raise Interrupted(f"received signal {received[0]}")

    if threading.current_thread() is not threading.main_thread():
        yield raise_pending
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if _in_uncuttable_code(frame):
            return  # raised by the next `raise_pending`, once that code is through
        raise Interrupted(f"received signal {signum}")

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum in handled}
    try:
        yield raise_pending
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


# Code an exception must not cut in two:
# - a write to the tracking store raised out of halfway leaves its SQLite transaction open,
#   and the KILLED status after it waits on that lock;
# - TensorFlow building the exception of a failed op for its C++ caller (a worker's
#   all-reduce broken by a lost peer, while the coordinator stops that worker): pybind11
#   turns a second exception raised there into a RuntimeError ("MISMATCH of original and
#   normalized active exception types"), and the op's own error is lost.
_UNCUTTABLE_CODE = tuple(
    f"{os.sep}{part}{os.sep}" for part in ("sqlalchemy", "sqlite3", "alembic")
) + (os.path.join("tensorflow", "python", "framework", "errors_impl.py"),)


def _in_uncuttable_code(frame: Any) -> bool:
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _UNCUTTABLE_CODE):
            return True
        frame = frame.f_back
    return False
