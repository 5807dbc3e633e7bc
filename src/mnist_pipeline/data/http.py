"""Downloads from http(s):// and file:// mirrors, bounded by timeouts and size caps, and gunzip."""

from __future__ import annotations

import http.client
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from ..config import FetchConfig
from ..errors import MirrorError, describe_error

CHUNK = 1 << 20


USER_AGENT = "mnist-pipeline-fetch/1"


def _progress(total: int | None, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.5,
    )


# --- http(s) and file:// mirrors -----------------------------------------------------------


class Unreachable(MirrorError):
    """The mirror could not be connected to at all (DNS, refused, connect timeout, TLS)."""


class _ConnectFailed(OSError):
    """Raised by our connections when the TCP/TLS connect itself fails (carries the cause)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _connection_class(
    base: type[http.client.HTTPConnection], read_timeout: float
) -> type[http.client.HTTPConnection]:
    """`base` connecting within the request's timeout, then reading with `read_timeout`."""

    class _Connection(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            try:
                super().connect()
            except OSError as err:
                raise _ConnectFailed(err) from err
            self.sock.settimeout(read_timeout)

    return _Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _connection_class(http.client.HTTPConnection, read_timeout)

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float) -> None:
        super().__init__()
        self._connection = _connection_class(http.client.HTTPSConnection, read_timeout)

    def https_open(self, req: urllib.request.Request) -> Any:
        context = self._context  # type: ignore[attr-defined]  # set by HTTPSHandler; stub omits it
        return self.do_open(self._connection, req, context=context)


def http_chunks(url: str, cfg: FetchConfig, *, desc: str, show_bar: bool) -> Iterator[bytes]:
    """Yield the body at `url`, bounded by the timeouts and `max_download_bytes`.

    Network failures become `MirrorError` with a one-line reason (`Unreachable` when no
    connection could be made at all).
    """
    opener = urllib.request.build_opener(
        _HTTPHandler(cfg.read_timeout_s), _HTTPSHandler(cfg.read_timeout_s)
    )
    request = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    )
    cap = cfg.max_download_bytes
    try:
        response = opener.open(request, timeout=cfg.connect_timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        raise MirrorError(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, _ConnectFailed):
            if isinstance(reason.cause, TimeoutError):
                raise Unreachable(f"connect timed out after {cfg.connect_timeout_s:g}s") from None
            raise Unreachable(f"cannot connect: {describe_error(reason.cause)}") from None
        raise MirrorError(describe_error(reason)) from None
    except TimeoutError:
        raise MirrorError(f"no response within {cfg.read_timeout_s:g}s (read timeout)") from None
    except (http.client.HTTPException, OSError) as err:
        raise MirrorError(f"bad response: {describe_error(err)}") from None

    with response:
        length = _content_length(response.headers.get("Content-Length"))
        if length is not None and length > cap:
            raise MirrorError(f"Content-Length {length:,} exceeds max_download_bytes ({cap:,})")
        received = 0
        # read1: return what one socket read brings (the read timeout applies to each).
        read = getattr(response, "read1", response.read)
        with _progress(length, desc, show_bar) as bar:
            while True:
                try:
                    chunk = read(CHUNK)
                except TimeoutError:
                    raise MirrorError(
                        f"read timed out after {cfg.read_timeout_s:g}s "
                        f"({received:,} bytes received)"
                    ) from None
                except (http.client.HTTPException, OSError) as err:
                    raise MirrorError(
                        f"download failed after {received:,} bytes: {describe_error(err)}"
                    ) from None
                if not chunk:
                    break
                received += len(chunk)
                if received > cap:
                    raise MirrorError(f"download exceeds max_download_bytes ({cap:,} bytes)")
                bar.update(len(chunk))
                yield chunk
    if length is not None and received != length:
        raise MirrorError(f"truncated download: {received:,} of {length:,} bytes")


def _content_length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())


def gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream incrementally, never more than `CHUNK` bytes at a time.

    The consumer bounds the total (see `_write_verified`), so a gzip bomb stops after at most
    `max_file_bytes + CHUNK` bytes were produced. Concatenated gzip members are supported.
    """
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    started = False
    try:
        for data in chunks:
            while data:
                if decomp.eof:  # another gzip member follows the previous one
                    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                started = True
                out = decomp.decompress(data, CHUNK)
                data = decomp.unconsumed_tail
                if decomp.eof:
                    data = decomp.unused_data
                if out:
                    yield out
                # Output capped at CHUNK may leave input consumed but output pending.
                while not data and not decomp.eof and len(out) == CHUNK:
                    out = decomp.decompress(b"", CHUNK)
                    data = decomp.unconsumed_tail
                    if out:
                        yield out
    except zlib.error as err:
        raise MirrorError(f"corrupt gzip data: {err}") from None
    if not started:
        raise MirrorError("empty response (expected gzip data)")
    if not decomp.eof:
        raise MirrorError("truncated gzip data (stream ended early)")
