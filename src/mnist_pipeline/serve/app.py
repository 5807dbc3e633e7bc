"""The model server's ASGI app: MLflow's scoring protocol, answered by the version's ONNX export
in ONNX Runtime, with micro-batching. No TensorFlow and no MLflow in this process.

    GET  /ping, /health   200 once the model is loaded
    GET  /version         the served model's name and version, requests and log counts
    GET  /metrics         Prometheus text format (`metrics.py`)
    POST /invocations     {"inputs": [[[...28 pixels...] x 28], ...]}
                          -> {"predictions": [[p0, ..., p9], ...], "unsure": [false, ...]}

`make serve` (`model_server.py`) finds the version's served artifacts and starts uvicorn with
`create` as the app factory; the folder and the limits reach it through the environment.
Every request is checked by `guard.check` (a 4xx with a reason for anything else); the
probabilities are calibrated and `unsure` marks answers below the version's abstention
threshold. Each answer is handed to the recorder (`recorder.py`), which feeds /metrics and
the request log off the request path.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..tracking.mnist_onnx import PRECISIONS, THREADS_ENV, OnnxDigitModel
from .batching import DEFAULT_MAX_IMAGES, DEFAULT_MAX_WAIT_S, MicroBatcher
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import ServerMetrics
from .recorder import Recorder
from .guard import (
    DEFAULT_MAX_BODY_BYTES,
    Receive,
    RequestRefused,
    Scope,
    Send,
    check,
    error,
    read_body,
    respond,
)

# How `model_server.model_server_command` configures the app in the server's process.
MODEL_DIR_ENV = "MNIST_SERVE_MODEL_DIR"
MODEL_NAME_ENV = "MNIST_SERVE_MODEL_NAME"
MODEL_VERSION_ENV = "MNIST_SERVE_MODEL_VERSION"
MAX_BODY_ENV = "MNIST_SERVE_MAX_BODY_BYTES"
MAX_BATCH_ENV = "MNIST_SERVE_MAX_BATCH"
MAX_WAIT_ENV = "MNIST_SERVE_MAX_WAIT_MS"
PRECISION_ENV = "MNIST_SERVE_PRECISION"  # float32 (default) or int8: which graph answers
LOG_ENV = "MNIST_SERVE_LOG"  # the request log's URL; unset or empty: no log
LOG_MAX_ROWS_ENV = "MNIST_SERVE_LOG_MAX_ROWS"
LOG_FLUSH_ENV = "MNIST_SERVE_LOG_FLUSH_S"
LOG_IMAGES_ENV = "MNIST_SERVE_LOG_IMAGE_SAMPLE_RATE"
PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed off the event loop


class ServingApp:
    def __init__(
        self,
        model: OnnxDigitModel,
        *,
        name: str = "",
        version: str = "",
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_batch: int = DEFAULT_MAX_IMAGES,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        recorder: Recorder | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: got {max_body_bytes}, expected an integer >= 1")
        self.model = model
        self.name, self.version = name, version
        self.max_body_bytes = max_body_bytes
        self.batcher = MicroBatcher(model.predict, max_images=max_batch, max_wait_s=max_wait_s)
        self.requests = 0  # answered by the model (with /version's model_calls: the batching)
        # Without a recorder given: /metrics only, no request log.
        self.recorder = recorder or Recorder(
            model=name,
            version=version,
            log_url=None,
            metrics=ServerMetrics(model=name, version=version, precision=model.precision),
        )
        self.recorder.metrics.register_model_calls(lambda: self.batcher.calls)
        self.metrics = self.recorder.metrics
        self.recorder.start()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # What waits for the recorder is written before the process ends.
            await lifespan(receive, send, on_shutdown=self.recorder.close)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/ping", "/health"):
            if method in ("GET", "HEAD"):
                await respond(send, 200, b"\n")
            else:
                await refuse(send, 405, f"{path} answers GET")
        elif path == "/version":
            await respond(
                send,
                200,
                orjson.dumps(
                    {
                        "model": self.name,
                        "version": self.version,
                        "runtime": "onnxruntime",
                        "precision": self.model.precision,
                        "requests": self.requests,
                        "model_calls": self.batcher.calls,
                        "log": {
                            "rows_written": self.recorder.written,
                            "rows_dropped": self.recorder.dropped,
                        },
                    }
                ),
            )
        elif path == "/metrics":
            await respond(send, 200, self.metrics.render(), METRICS_TYPE)
        elif path == "/invocations":
            started = time.perf_counter()
            if method != "POST":
                status = await refuse(send, 405, "/invocations answers POST")
            else:
                status = await self.invocations(scope, receive, send)
            self.metrics.answered(status, time.perf_counter() - started)
        else:
            await refuse(
                send, 404, f"no such endpoint {path!r}: POST /invocations, GET /ping, GET /metrics"
            )

    async def invocations(self, scope: Scope, receive: Receive, send: Send) -> int:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            with self.batcher.expecting():
                body = await read_body(headers, receive, self.max_body_bytes)
                if len(body) > PARSE_INLINE_BYTES:
                    images = await asyncio.to_thread(check, headers.get("content-type"), body)
                else:
                    images = check(headers.get("content-type"), body)
        except RequestRefused as refused:
            return await refuse(send, refused.status, refused.reason)
        self.requests += 1
        probabilities = await self.batcher.submit(images)
        unsure = self.model.unsure(probabilities)
        await respond(
            send,
            200,
            orjson.dumps(
                {"predictions": probabilities, "unsure": unsure}, option=orjson.OPT_SERIALIZE_NUMPY
            ),
        )
        self.recorder.record(images, probabilities, unsure)
        return 200


async def refuse(send: Send, status: int, reason: str) -> int:
    await respond(send, status, error(status, reason))
    return status


async def lifespan(
    receive: Receive, send: Send, on_shutdown: Callable[[], None] = lambda: None
) -> None:
    """Nothing to start (the model was loaded when the app was made); `on_shutdown` runs
    before the server is told shutdown is complete."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(on_shutdown)
            await send({"type": "lifespan.shutdown.complete"})
            return


# ONNX Runtime's intra-op threads in the server unless MNIST_SERVE_THREADS says otherwise: one
# core computes while the event loop reads and answers on the other (measured: 8 clients got
# 24% more requests/s than with both cores computing; batches of 256 lost 17%).
SERVER_THREADS = "1"


def create() -> ServingApp:
    """The app each server process runs (uvicorn --factory), configured by the environment."""
    name, version = os.environ.get(MODEL_NAME_ENV, ""), os.environ.get(MODEL_VERSION_ENV, "")
    precision = os.environ.get(PRECISION_ENV) or "float32"
    if precision not in PRECISIONS:
        raise ValueError(
            f"{PRECISION_ENV}: got {precision!r}, expected one of {sorted(PRECISIONS)}"
        )
    model = OnnxDigitModel(
        os.environ[MODEL_DIR_ENV], os.environ.get(THREADS_ENV) or SERVER_THREADS, precision
    )
    recorder = Recorder(
        model=name,
        version=version,
        metrics=ServerMetrics(model=name, version=version, precision=model.precision),
        log_url=os.environ.get(LOG_ENV) or None,
        max_rows=_int(LOG_MAX_ROWS_ENV, 1_000_000),
        flush_interval_s=_number(LOG_FLUSH_ENV, 0.5, float),
        image_sample_rate=_number(LOG_IMAGES_ENV, 0.0, float),
    )
    return ServingApp(
        model,
        name=name,
        version=version,
        max_body_bytes=_int(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES),
        max_batch=_int(MAX_BATCH_ENV, DEFAULT_MAX_IMAGES),
        max_wait_s=_int(MAX_WAIT_ENV, round(DEFAULT_MAX_WAIT_S * 1000)) / 1000,
        recorder=recorder,
    )


def _int(name: str, default: int) -> int:
    return _number(name, default, int)


def _number(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
    """Environment variable `name` read by `parse` (int or float); `default` when unset."""
    text = os.environ.get(name, "")
    try:
        return parse(text) if text else default
    except ValueError:
        expected = "an integer" if parse is int else "a number"
        raise ValueError(f"{name}: got {text!r}, expected {expected}") from None
