"""The model server's ASGI app: MLflow's scoring protocol, answered by the version's ONNX export
in ONNX Runtime, with micro-batching. No TensorFlow and no MLflow in this process.

    GET  /ping, /health   200 once the model is loaded
    GET  /version         the served model's name and version
    POST /invocations     {"inputs": [[[...28 pixels...] x 28], ...]}
                          -> {"predictions": [[p0, ..., p9], ...], "unsure": [false, ...]}

`make serve` (`model_server.py`) finds the version's served artifacts and starts uvicorn with
`create` as the app factory; the folder and the limits reach it through the environment.
Every request is checked by `guard.check` (a 4xx with a reason for anything else); the
probabilities are calibrated and `unsure` marks answers below the version's abstention
threshold.
"""

from __future__ import annotations

import asyncio
import os

import orjson

from ..tracking.mnist_onnx import THREADS_ENV, OnnxDigitModel
from .batching import DEFAULT_MAX_IMAGES, DEFAULT_MAX_WAIT_S, MicroBatcher
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
PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed off the event loop


class ServingApp:
    def __init__(self, model: OnnxDigitModel, *, name: str = "", version: str = "",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_batch: int = DEFAULT_MAX_IMAGES,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: got {max_body_bytes}, expected an integer >= 1")
        self.model = model
        self.name, self.version = name, version
        self.max_body_bytes = max_body_bytes
        self.batcher = MicroBatcher(model.predict, max_images=max_batch, max_wait_s=max_wait_s)
        self.requests = 0  # answered by the model (with /version's model_calls: the batching)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
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
            await respond(send, 200, orjson.dumps({
                "model": self.name, "version": self.version, "runtime": "onnxruntime",
                "requests": self.requests, "model_calls": self.batcher.calls}))
        elif path == "/invocations":
            if method != "POST":
                await refuse(send, 405, "/invocations answers POST")
            else:
                await self.invocations(scope, receive, send)
        else:
            await refuse(send, 404, f"no such endpoint {path!r}: POST /invocations, GET /ping")

    async def invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            with self.batcher.expecting():
                body = await read_body(headers, receive, self.max_body_bytes)
                if len(body) > PARSE_INLINE_BYTES:
                    images = await asyncio.to_thread(check, headers.get("content-type"), body)
                else:
                    images = check(headers.get("content-type"), body)
        except RequestRefused as refused:
            await refuse(send, refused.status, refused.reason)
            return
        self.requests += 1
        probabilities = await self.batcher.submit(images)
        unsure = self.model.unsure(probabilities)
        await respond(send, 200, orjson.dumps(
            {"predictions": probabilities, "unsure": unsure},
            option=orjson.OPT_SERIALIZE_NUMPY))


async def refuse(send: Send, status: int, reason: str) -> None:
    await respond(send, status, error(status, reason))


async def lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: the model was loaded when the app was made."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ONNX Runtime's intra-op threads in the server unless MNIST_SERVE_THREADS says otherwise: one
# core computes while the event loop reads and answers on the other (measured: 8 clients got
# 24% more requests/s than with both cores computing; batches of 256 lost 17%).
SERVER_THREADS = "1"


def create() -> ServingApp:
    """The app each server process runs (uvicorn --factory), configured by the environment."""
    return ServingApp(
        OnnxDigitModel(os.environ[MODEL_DIR_ENV],
                       os.environ.get(THREADS_ENV) or SERVER_THREADS),
        name=os.environ.get(MODEL_NAME_ENV, ""), version=os.environ.get(MODEL_VERSION_ENV, ""),
        max_body_bytes=_int(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES),
        max_batch=_int(MAX_BATCH_ENV, DEFAULT_MAX_IMAGES),
        max_wait_s=_int(MAX_WAIT_ENV, round(DEFAULT_MAX_WAIT_S * 1000)) / 1000)


def _int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise ValueError(f"{name}: got {text!r}, expected an integer") from None
