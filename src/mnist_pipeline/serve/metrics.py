"""The model server's live metrics, served at /metrics in Prometheus' text format.

Through the official `prometheus-client` library, on a registry of the app's own (nothing of
the process's other collectors):

    mnist_served_model_info{model,version,runtime,precision}  the served version (always 1)
    mnist_requests_total{status}                         requests answered, by HTTP status
    mnist_request_duration_seconds                       /invocations latency histogram
    mnist_predictions_total{digit}                       images answered, by predicted class
    mnist_abstentions_total                              images answered below the threshold
    mnist_prediction_confidence                          calibrated confidence histogram
    mnist_model_calls_total                              model calls (micro-batching shares them)
    mnist_request_log_rows_total{outcome}                rows written to the request log, or
                                                         dropped because it failed

The request counter and the latency histogram are updated on the request path (a few
microseconds). The per-image figures are added by the recorder's thread, in bulk, a batch
at a time (`observe_predictions`), so they lag the answers by at most the recorder's flush
interval. Each server process has its own figures: run one worker per port (the default)
and scrape each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)


class BulkHistogram(Collector):
    """A histogram fed a whole array at a time (one `np.searchsorted` per batch, instead of one
    `Histogram.observe` per image), exposed as an ordinary Prometheus histogram."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        # Prometheus buckets are `le` (<= bound): the first bound >= the value.
        slots = np.searchsorted(self.bounds, values, side="left")
        added = np.bincount(slots, minlength=len(self.counts))
        with self._lock:
            self.counts += added
            self.total += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        buckets = [
            (_le(bound), count)
            for bound, count in zip(self.bounds.tolist(), cumulative, strict=False)
        ]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class _Read(Collector):
    """A counter kept elsewhere (the batcher's call count), read at each scrape."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())


def _le(bound: float) -> str:
    return repr(float(bound))


class ServerMetrics:
    def __init__(
        self,
        *,
        model: str,
        version: str,
        runtime: str = "onnxruntime",
        precision: str = "float32",
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        info = Gauge(
            "mnist_served_model_info",
            "The model version this server answers with, and which of its graphs",
            ["model", "version", "runtime", "precision"],
            registry=self.registry,
        )
        info.labels(model=model, version=version, runtime=runtime, precision=precision).set(1)
        self.requests = Counter(
            "mnist_requests",
            "Requests answered, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mnist_request_duration_seconds",
            "Time from a request's arrival to its answer (/invocations)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "mnist_predictions",
            "Images answered, by predicted digit",
            ["digit"],
            registry=self.registry,
        )
        self._by_digit = [self.predictions.labels(digit=str(d)) for d in range(10)]
        self.abstentions = Counter(
            "mnist_abstentions",
            "Images answered below the abstention threshold (unsure)",
            registry=self.registry,
        )
        self.confidence = BulkHistogram(
            "mnist_prediction_confidence",
            "Calibrated confidence of the answers",
            CONFIDENCE_BUCKETS,
        )
        self.registry.register(self.confidence)
        log_rows = Counter(
            "mnist_request_log_rows",
            "Rows written to the request log, or dropped because the log failed",
            ["outcome"],
            registry=self.registry,
        )
        self.log_written = log_rows.labels(outcome="written")
        self.log_dropped = log_rows.labels(outcome="dropped")
        self._status: dict[int, Counter] = {}

    def register_model_calls(self, read: Callable[[], int]) -> None:
        """Serve the batcher's call count as `mnist_model_calls_total`."""
        self.registry.register(
            _Read(
                "mnist_model_calls", "Model calls (one serves every request of a micro-batch)", read
            )
        )

    def answered(self, status: int, seconds: float | None = None) -> None:
        """One request answered with `status` (and, for /invocations, its latency)."""
        counter = self._status.get(status)
        if counter is None:
            counter = self._status[status] = self.requests.labels(status=str(status))
        counter.inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def observe_predictions(
        self, predicted: np.ndarray, confidence: np.ndarray, unsure: np.ndarray
    ) -> None:
        """A batch of answered images (the recorder's thread)."""
        for digit, count in enumerate(np.bincount(predicted, minlength=10)[:10].tolist()):
            if count:
                self._by_digit[digit].inc(count)
        abstained = int(np.count_nonzero(unsure))
        if abstained:
            self.abstentions.inc(abstained)
        self.confidence.observe(confidence)

    def render(self) -> bytes:
        return generate_latest(self.registry)
