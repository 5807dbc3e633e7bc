"""Every request the model server gets is checked here: a well-formed image batch comes back
as uint8 images, anything else as a 4xx with a reason the client can act on.

Accepted: `POST /invocations` with `Content-Type: application/json` (UTF-8) and a body that is
exactly `{"inputs": <N x 28 x 28 whole numbers 0..255>}` (or `instances`, MLflow's other
tensor key), optionally with `"params": {}`: MLflow's request format, so clients written for
`mlflow models serve` keep working. Refused, each with its reason: no or another Content-Type
(415), another charset (415), a body over the limit (413, before it is read whole), bytes
that are not JSON, JSON nested too deeply to parse (MLflow's own server answered this with a
500), any other top-level shape or key, pixels that are not whole numbers 0..255 (MLflow
silently truncated 0.5 to pixel 0), ragged or mis-shaped arrays, and an empty batch (400).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # ~4,000 images as JSON integers
INPUT_KEYS = ("inputs", "instances")  # where MLflow's tensor input formats carry pixels
IMAGE_SHAPE = (28, 28)
FORMAT = 'send {"inputs": [<28 rows of 28 pixels 0..255>, ...]} (one 28x28 image per item)'


class RequestRefused(Exception):
    """A request answered with `status` and `reason` before MLflow sees it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to be over `limit`."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestRefused(
            413,
            f"request body of {int(declared)} bytes is over this "
            f"server's limit of {limit} bytes: send fewer images "
            "per request",
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestRefused(400, "the client disconnected before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestRefused(
                413,
                f"request body over this server's limit of {limit} "
                "bytes: send fewer images per request",
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check(content_type: str | None, body: bytes | str) -> np.ndarray:
    """The uint8 (N, 28, 28) images of a well-formed request; RequestRefused otherwise."""
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if content_type is None or not content_type.strip():
        raise RequestRefused(415, "no Content-Type header: send 'Content-Type: application/json'")
    media, _, parameters = content_type.partition(";")
    if media.strip().lower() != "application/json":
        raise RequestRefused(
            415,
            f"Content-Type {media.strip()!r}: this server only supports "
            "the following content types: application/json",
        )
    charset = parameters.strip().lower()
    if charset and charset.replace(" ", "") not in ("charset=utf-8", 'charset="utf-8"'):
        raise RequestRefused(
            415,
            f"Content-Type parameter {parameters.strip()!r}: this server only supports UTF-8 JSON",
        )
    fast = _plain_images(body)
    if fast is not None:
        return fast
    try:
        document = json.loads(body)
    except RecursionError:
        raise RequestRefused(400, f"JSON nested too deeply to parse: {FORMAT}") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise RequestRefused(
            400, f"the body is not valid JSON ({str(err)[:120]}): {FORMAT}"
        ) from None
    if not isinstance(document, dict):
        raise RequestRefused(
            400, f"expected a JSON object, got {type(document).__name__}: {FORMAT}"
        )
    keys = [key for key in INPUT_KEYS if key in document]
    extra = sorted(set(document) - {*INPUT_KEYS, "params"})
    if len(keys) != 1 or extra:
        raise RequestRefused(
            400,
            f"got keys {sorted(document)}, expected exactly one of the "
            f"input fields {list(INPUT_KEYS)} (and optionally "
            f"'params'): {FORMAT}",
        )
    if document.get("params") not in (None, {}):
        raise RequestRefused(
            400, "'params': this model takes no parameters; send 'params': {} or leave it out"
        )
    return images_of(keys[0], document[keys[0]])


# The body of nearly every request: `{"inputs": [[[0, 0, ...], ...], ...]}` with whole numbers
# and nothing else. Its brackets alone must read exactly "[" + N * ("[" + 28 * "[]" + "]") + "]";
# then the numbers are read in one C call. Anything else (other keys, floats, signs, NaN,
# spacing inside numbers) goes through json.loads and `images_of`, which name what is wrong.
_KEYS = tuple(f'{{"{key}":'.encode() for key in INPUT_KEYS)
_NOT_BRACKETS = b"0123456789, \t\r\n"
_BRACKETS_AS_SPACES = bytes.maketrans(b"[]", b"  ")
_IMAGE_SKELETON = b"[" + b"[]" * IMAGE_SHAPE[0] + b"]"
_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


def _plain_images(body: bytes) -> np.ndarray | None:
    """The images of a body in the plain form above, read fast; None for any other body."""
    body = body.strip()
    key = next((k for k in _KEYS if body.startswith(k)), None)
    if key is None or not body.endswith(b"}"):
        return None
    array = body[len(key) : -1]
    skeleton = array.translate(None, _NOT_BRACKETS)
    count = (len(skeleton) - 2) // len(_IMAGE_SKELETON)
    if count < 1 or skeleton != b"[" + _IMAGE_SKELETON * count + b"]":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a short read: checked below
        numbers = np.fromstring(array.translate(_BRACKETS_AS_SPACES), dtype=np.int64, sep=",")
    if numbers.size != count * _PIXELS or numbers.min() < 0 or numbers.max() > 255:
        return None
    return numbers.astype(np.uint8).reshape(count, *IMAGE_SHAPE)


def images_of(key: str, values: Any) -> np.ndarray:
    """`values` as uint8 images (N, 28, 28): whole numbers 0..255, nothing else."""
    if not isinstance(values, list):
        raise RequestRefused(
            400, f"'{key}': expected a list of images, got {type(values).__name__}: {FORMAT}"
        )
    try:
        pixels = np.asarray(values)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise RequestRefused(
            400, f"'{key}': not an array of numbers ({str(err).splitlines()[0][:160]}): {FORMAT}"
        ) from None
    if pixels.dtype.kind == "O":
        raise RequestRefused(
            400,
            f"'{key}': integers too large for 64 bits, or values of "
            f"mixed types: pixels must be whole numbers in 0..255",
        )
    if pixels.dtype.kind not in "iuf":
        sample = f", such as {pixels.flat[0].item()!r}" if pixels.size else ""
        raise RequestRefused(
            400,
            f"'{key}': pixels must be whole numbers in 0..255, got "
            f"{pixels.dtype.name} values{sample}",
        )
    bad = (pixels < 0) | (pixels > 255)
    if pixels.dtype.kind == "f":
        bad |= ~np.isfinite(pixels) | (pixels != np.floor(pixels))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise RequestRefused(
            400,
            f"'{key}': pixels must be whole numbers in 0..255 (uint8), "
            f"got {pixels[where].item()!r} at index {list(where)} "
            f"({int(bad.sum())} such values)",
        )
    if pixels.shape[:1] == (0,):
        raise RequestRefused(400, f"'{key}': an empty batch: send at least one image")
    if pixels.ndim != 3 or pixels.shape[1:] != IMAGE_SHAPE:
        raise RequestRefused(
            400,
            f"'{key}': shape {pixels.shape} does not match expected shape (-1, 28, 28): {FORMAT}",
        )
    return pixels.astype(np.uint8)


def error(status: int, reason: str) -> bytes:
    """MLflow's error shape: {"error_code": ..., "message": ...}."""
    code = "REQUEST_LIMIT_EXCEEDED" if status == 413 else "BAD_REQUEST"
    return json.dumps({"error_code": code, "message": reason}).encode()


async def respond(
    send: Send, status: int, payload: bytes, content_type: str = "application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
