"""Raw HTTP against a model server on loopback: any body, any headers (or none)."""

from __future__ import annotations

import http.client
import json


def post(
    port: int,
    body: bytes | str | object,
    content_type: str | None = "application/json",
    path: str = "/invocations",
    headers: dict[str, str] | None = None,
    timeout_s: float = 60,
) -> tuple[int, bytes]:
    """POST `body` (JSON-encoded unless bytes or str); no Content-Type header when None."""
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", path, body=body, headers=sent)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def alive(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/ping")
        return connection.getresponse().status == 200
    finally:
        connection.close()
