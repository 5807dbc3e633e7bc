"""What the server answered, recorded off the request path: the prediction metrics and the
request log.

A request hands its images, probabilities and unsure flags to `Recorder.record`: one list
append, nothing computed. The recorder's thread wakes every `flush_interval_s` (sooner when
`FLUSH_ROWS` images wait), computes the statistics of the whole batch at once
(`monitoring.features`), adds them to /metrics and appends them to the request log in one
transaction (`monitoring.requestlog`).

A log that fails (a full disk, a read-only folder, a database gone) never fails a request:
the server prints one warning when writes start failing and one when they work again, counts
the rows it dropped (`mnist_request_log_rows_total{outcome="dropped"}`), and tries again
at the next flush. A SIGKILL loses at most what waited for the next flush: up to
`flush_interval_s` of answers.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..monitoring import features
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..monitoring.requestlog import RequestLog

FLUSH_ROWS = 4096  # images waiting that wake the thread before its interval
MAX_PENDING_ROWS = 200_000  # beyond this (a log that hangs), new answers are not recorded


def _warn(message: str) -> None:
    print(f"serve: WARNING: {message}", file=sys.stderr, flush=True)


class Recorder:
    def __init__(
        self,
        *,
        model: str,
        version: str,
        metrics: ServerMetrics,
        log_url: str | None,
        max_rows: int = 1_000_000,
        flush_interval_s: float = 0.5,
        image_sample_rate: float = 0.0,
        warn: Callable[[str], None] = _warn,
    ) -> None:
        if not 0 < flush_interval_s <= 60:
            raise ValueError(f"flush_interval_s: got {flush_interval_s}, expected (0, 60]")
        if not 0 <= image_sample_rate <= 1:
            raise ValueError(f"image_sample_rate: got {image_sample_rate}, expected [0, 1]")
        self.model, self.version = model, version
        self.metrics = metrics
        self.log_url = log_url
        self.max_rows = max_rows
        self.flush_interval_s = flush_interval_s
        self.image_sample_rate = image_sample_rate
        self.warn = warn
        self.requests = 0  # requests recorded (the log's `request` column)
        self.written = 0  # rows in the log
        self.dropped = 0  # rows lost to a failing log (or a full queue)
        self._log: RequestLog | None = None  # opened by the first flush
        self._failing = False
        # Appended on the event loop, taken by the thread: deque's append and popleft are
        # atomic, so no answer is lost between them.
        self._pending: deque[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = deque()
        self._pending_rows = 0
        self._rng = np.random.default_rng()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def record(self, images: np.ndarray, probabilities: np.ndarray, unsure: np.ndarray) -> None:
        """Called for each answered request, on the event loop: an append, nothing more."""
        self.requests += 1
        if self._pending_rows >= MAX_PENDING_ROWS:
            self.dropped += len(images)
            self.metrics.log_dropped.inc(len(images))
            return
        self._pending.append((time.time(), self.requests, images, probabilities, unsure))
        self._pending_rows += len(images)
        if self._pending_rows >= FLUSH_ROWS:
            self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is waiting and stop the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.flush()
        if self._log is not None:
            self._log.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Record everything waiting now (the thread calls it; so do tests and `close`)."""
        with self._flushing:
            self._pending_rows = 0
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if not batch:
                return
            count = sum(len(item[2]) for item in batch)
            images = np.concatenate([item[2] for item in batch])
            probabilities = np.concatenate([item[3] for item in batch])
            unsure = np.concatenate([np.asarray(item[4], dtype=bool) for item in batch])
            predicted, confidence, entropy = features.output_statistics(probabilities)
            self.metrics.observe_predictions(predicted, confidence, unsure)
            if self.log_url is None:
                return
            # SQLAlchemy is imported by the first flush, not at start-up (nor at all without
            # a log): the server answers /ping sooner.
            from ..monitoring.requestlog import RequestLog, Rows, describe_failure, display

            sizes = [len(item[2]) for item in batch]
            rows = Rows(
                time=np.repeat([item[0] for item in batch], sizes),
                request=np.repeat([item[1] for item in batch], sizes).astype(np.int64),
                predicted=predicted,
                confidence=confidence,
                entropy=entropy,
                unsure=unsure,
                inputs=features.input_statistics(images),
                images=self._sample(images),
            )
            try:
                if self._log is None:
                    self._log = RequestLog(self.log_url, create=True)
                self._log.append(self.model, self.version, rows, self.max_rows)
            except Exception as err:  # noqa: BLE001 - no failure of the log fails a request
                self.dropped += count
                self.metrics.log_dropped.inc(count)
                if not self._failing:
                    self._failing = True
                    self.warn(
                        f"the request log {display(self.log_url)} failed "
                        f"({describe_failure(err)}); answering goes on, and the "
                        "answers are not logged until it works again"
                    )
                if self._log is not None:  # a fresh connection next time
                    self._log.close()
                    self._log = None
                return
            self.written += count
            self.metrics.log_written.inc(count)
            if self._failing:
                self._failing = False
                self.warn(
                    f"the request log {display(self.log_url)} works again "
                    f"({self.dropped} rows were not logged)"
                )

    def _sample(self, images: np.ndarray) -> list[bytes | None] | None:
        if self.image_sample_rate <= 0:
            return None
        kept = self._rng.random(len(images)) < self.image_sample_rate
        return [image.tobytes() if keep else None for image, keep in zip(images, kept, strict=True)]
