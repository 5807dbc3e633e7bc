"""Load on a model server: concurrent keep-alive clients, their latencies, the server's memory.

Used by `benchmarks/serve_speed.py` and the soak test. Each client is a thread with one
HTTP/1.1 connection that it reuses, as a service calling the model would; bodies are encoded
before the clock starts, so what is timed is the round trip.
"""

from __future__ import annotations

import http.client
import itertools
import statistics
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # first few non-200 answers or failures
    wall_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        return self.count - self.statuses.get(200, 0)

    def quantile_ms(self, q: float) -> float:
        if len(self.latencies_s) < 2:
            return 1000 * (self.latencies_s[0] if self.latencies_s else float("nan"))
        return (
            1000
            * statistics.quantiles(self.latencies_s, n=1000, method="inclusive")[
                min(999, max(0, round(q * 1000) - 1))
            ]
        )

    def per_s(self) -> float:
        return self.count / self.wall_s if self.wall_s else float("nan")


class Client:
    """One keep-alive connection to `url` (reconnects after the server closes it)."""

    def __init__(self, url: str, timeout_s: float = 120) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"{url}: no host to connect to")
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if headers is None else headers
        for attempt in (0, 1):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout_s
                )
            try:
                self.connection.request("POST", self.path, body=body, headers=headers)
                response = self.connection.getresponse()
                answer = response.read()
                if response.will_close:
                    self.close()
                return response.status, answer
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # an idle keep-alive connection the server dropped: once more
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def run_clients(
    url: str,
    bodies: Sequence[bytes],
    requests: int,
    clients: int,
    every: int = 0,
    on_every: Callable[[int], None] | None = None,
) -> Result:
    """`requests` POSTs of `bodies` (in turn) from `clients` threads; `on_every(done)` runs
    after each `every` completed requests (from the client that completed it)."""
    result = Result()
    lock = threading.Lock()
    tickets = itertools.count()

    def work() -> None:
        client = Client(url)
        try:
            while (ticket := next(tickets)) < requests:
                started = time.perf_counter()
                try:
                    status, answer = client.post(bodies[ticket % len(bodies)])
                except (OSError, http.client.HTTPException) as err:
                    client.close()
                    status, answer = 0, repr(err).encode()
                elapsed = time.perf_counter() - started
                with lock:
                    result.latencies_s.append(elapsed)
                    result.statuses[status] += 1
                    if status != 200 and len(result.errors) < 5:
                        result.errors.append(f"{status}: {answer[:200]!r}")
                    done = result.count
                if every and on_every and done % every == 0:
                    on_every(done)
        finally:
            client.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    return result


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (Linux /proc), in bytes."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
