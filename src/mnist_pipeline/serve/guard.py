"""A thin ASGI layer in front of MLflow's scoring app: every bad request gets a 4xx with a
reason, and well-formed image batches skip MLflow's slow request parsing.

MLflow 3.17's scoring server (`mlflow/pyfunc/scoring_server/__init__.py`) answers three kinds
of bad request wrongly, and none of them can be configured away (docs/serving.md):

- no `Content-Type`: `invocations()` calls `content_type.split(";")` on None; the
  AttributeError is no MlflowException, so 500;
- deeply nested JSON: `_decode_json_input` catches JSONDecodeError and UnicodeDecodeError
  but not the RecursionError `json.loads` raises, so 500;
- fractional pixels: `convert_data_type` (`mlflow/utils/proto_json_utils.py`) builds
  `np.array(values, dtype=uint8)` before the signature is enforced, so 0.5 silently becomes
  pixel 0 and the answer is a wrong 200.

This layer checks exactly those, and refuses bodies over `max_body_bytes` (413) before
reading them whole. A body that is exactly `{"inputs": <N x 28 x 28 whole numbers 0..255>}`
(or `instances`) it answers itself through `predict` (the same pyfunc model MLflow's app
serves, schema check included) with MLflow's response format, plus `"unsure"`: per image,
whether its calibrated confidence is below the model's abstention threshold. MLflow's parser
deep-copies the nested lists before converting them (`_cast_schema_type`), ~80% of a
256-image request.
Everything else (other shapes, types, keys, `params`, CSV, JSON syntax errors) goes to MLflow's
app with the same bytes, and gets MLflow's answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # ~4,000 images as JSON integers
INPUT_KEYS = ("inputs", "instances")  # where MLflow's tensor input formats carry pixels
IMAGE_SHAPE = (28, 28)
Predict = Callable[[np.ndarray], Any]   # uint8 (N, 28, 28) -> (N, 10) probabilities


class RequestRefused(Exception):
    """A request answered with `status` and `reason` before MLflow sees it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Guard:
    """ASGI middleware: checks POST /invocations, passes everything else through untouched.

    `predict` (optional) answers well-formed image batches; a `RequestRefused` it raises
    becomes that 4xx."""

    def __init__(self, app: App, predict: Predict | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threshold: float = 0.0) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes: got {max_body_bytes}, expected an integer >= 1")
        self.app = app
        self.predict = predict
        self.max_body_bytes = max_body_bytes
        self.threshold = threshold  # answers below this calibrated confidence are unsure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or \
                scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope["headers"]}
            body = await self.read_body(headers, receive)
            # Off the event loop: parsing a large batch takes tens of milliseconds.
            predictions = await asyncio.to_thread(self.answer, headers.get("content-type"),
                                                  body)
        except RequestRefused as refused:
            await respond(send, refused.status, error(refused.status, refused.reason))
            return
        if predictions is None:
            await self.app(scope, replay(body, receive), send)
        else:
            await respond(send, 200, predictions)

    def answer(self, content_type: str | None, body: bytes) -> bytes | None:
        """The response body for a well-formed image batch; None to let MLflow's app answer."""
        images = check(content_type, body)
        if images is None or self.predict is None:
            return None
        probabilities = np.asarray(self.predict(images))
        unsure = probabilities.max(axis=1) < self.threshold
        return json.dumps({"predictions": probabilities.tolist(),
                           "unsure": unsure.tolist()}).encode()

    async def read_body(self, headers: dict[str, str], receive: Receive) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestRefused(413, f"request body of {int(declared)} bytes is over this "
                                      f"server's limit of {limit} bytes: send fewer images "
                                      "per request")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRefused(400, "the client disconnected before sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestRefused(413, f"request body over this server's limit of {limit} "
                                          "bytes: send fewer images per request")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def check(content_type: str | None, body: bytes) -> np.ndarray | None:
    """Raise RequestRefused for what MLflow would answer with a 5xx or a wrong 200; return
    the images of a well-formed `{"inputs": ...}` body as uint8, else None."""
    if content_type is None or not content_type.strip():
        raise RequestRefused(415, "no Content-Type header: send 'Content-Type: "
                                  "application/json' (or text/csv)")
    media, _, parameters = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return None  # MLflow answers other types itself (CSV is parsed, the rest get 415)
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestRefused(400, "JSON nested too deeply to parse: send pixels as "
                                  "{\"inputs\": [[[...28 values...] x28] per image]}") from None
    except ValueError:
        return None  # not JSON (or not UTF-8): MLflow's 400 says so
    if not isinstance(document, dict):
        return None
    pixels = [check_pixels(key, document[key]) for key in INPUT_KEYS if key in document]
    plain = len(document) == 1 and parameters.strip().lower() in ("", "charset=utf-8")
    if plain and pixels and pixels[0] is not None and pixels[0].ndim == 3 and \
            pixels[0].shape[1:] == IMAGE_SHAPE and len(pixels[0]):
        return pixels[0].astype(np.uint8)
    return None


def check_pixels(key: str, values: Any) -> np.ndarray | None:
    """Numeric pixel arrays must hold whole numbers 0..255; returns them, or None for other
    shapes and types, which are left to MLflow's signature checks (which name them)."""
    if not isinstance(values, list):
        return None
    try:
        pixels = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None  # ragged: MLflow refuses it with its reason
    if pixels.dtype.kind not in "iuf":
        return None  # strings, objects, booleans, huge integers: MLflow's reason
    bad = (pixels < 0) | (pixels > 255)
    if pixels.dtype.kind == "f":
        bad |= ~np.isfinite(pixels) | (pixels != np.floor(pixels))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise RequestRefused(400, f"'{key}': pixels must be whole numbers in 0..255 (uint8), "
                                  f"got {pixels[where].item()!r} at index {list(where)} "
                                  f"({int(bad.sum())} such values)")
    return pixels


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body, then the server's own messages (a
    disconnect, when the client goes)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def error(status: int, reason: str) -> bytes:
    """MLflow's error shape: {"error_code": ..., "message": ...}."""
    code = "REQUEST_LIMIT_EXCEEDED" if status == 413 else "BAD_REQUEST"
    return json.dumps({"error_code": code, "message": reason}).encode()


async def respond(send: Send, status: int, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
