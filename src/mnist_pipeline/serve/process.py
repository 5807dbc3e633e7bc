"""Running a server as a subprocess: its command line, address checks, start, wait, stop.

Shared by the model server (`model_server`) and the tracking UI (`ui`).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .. import startup
from ..errors import ServerError

DEFAULT_WORKERS = 1
READY_TIMEOUT_S = 300  # loading TensorFlow and the model takes ~30 s on 2 busy cores


WILDCARDS = ("0.0.0.0", "::", "[::]")  # bind addresses meaning "every interface"


@dataclass(frozen=True)
class ServerCommand:
    """A server's exact command line, the environment it runs with, and where it answers."""

    argv: list[str]
    env_overrides: dict[str, str]  # set on top of the caller's environment
    url: str  # what a person opens or calls
    ready_url: str  # answers HTTP 200 once the server can do its job
    warnings: list[str] = field(default_factory=list)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env_overrides}

    def shell(self) -> str:
        """The command as one line a person can paste into a shell."""
        assignments = [
            f"{k}={shlex.quote(v)}" for k, v in sorted(self.env_overrides.items()) if k != "PATH"
        ]
        return " ".join([*assignments, shlex.join(self.argv)])


# --- addresses -----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int, workers: int) -> list[str]:
    """Validate host/port/workers; return warnings (binding beyond loopback is allowed only
    when asked for explicitly, and always warned about)."""
    if not host or any(c.isspace() for c in host):
        raise ServerError(f"--host: got {host!r}, expected an address such as 127.0.0.1")
    if not 1 <= port <= 65535:
        raise ServerError(f"--port: got {port}, expected an integer in [1, 65535]")
    if workers < 1:
        raise ServerError(f"--workers: got {workers}, expected an integer >= 1")
    if is_loopback(host):
        return []
    return [
        f"binding {host}:{port} exposes this server to every network that can reach this "
        "machine, with no authentication; use the default 127.0.0.1 unless you mean it"
    ]


def authority(host: str, port: int) -> str:
    """`host:port` as it appears in a URL or a Host header (IPv6 in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def url_for(host: str, port: int) -> str:
    """The URL a local client uses: a wildcard bind is reached through loopback."""
    if host in WILDCARDS:
        host = "127.0.0.1"
    return f"http://{authority(host, port)}"


def server_path() -> str:
    """PATH with this interpreter's folder first: MLflow starts `uvicorn` by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# --- running a server (shared with `ui`) ---------------------------------------------------


def start(
    command: ServerCommand,
    *,
    log: IO[bytes] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stderr: IO[bytes] | None = None,
) -> subprocess.Popen:
    """Start the server in its own process group, so `stop` ends it and its workers together.

    Its output goes to `log` (both streams) if given, else to ours (stderr to `stderr` if given).
    """
    try:
        return subprocess.Popen(
            command.argv,
            env=command.env(),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT if log else stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as err:
        raise ServerError(f"could not start {command.argv[0]}: {err}") from None


def wait_until_ready(
    process: subprocess.Popen,
    url: str,
    timeout_s: float = READY_TIMEOUT_S,
    cafile: str | None = None,
) -> float:
    """Poll `url` until it answers 200; return the seconds waited. An https `url` is checked
    against the CA certificate `cafile` when given.

    Fails at once if the server exits (a port already in use, a missing model, a broken store).
    """
    import ssl

    started = time.monotonic()
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # loopback
    if cafile:
        handlers.append(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile))
        )
    opener = urllib.request.build_opener(*handlers)
    while True:
        code = process.poll()
        if code is not None:
            raise ServerError(
                f"the server exited with status {code} before {url} answered (see its output above)"
            )
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            raise ServerError(f"{url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.25)


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after `timeout_s`."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)  # workers that outlived their parent
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # the group `start` created: its id is the server's pid
    except (ProcessLookupError, PermissionError):
        pass


def run_foreground(command: ServerCommand, name: str, ready_line: str) -> int:
    """Run a server until Ctrl-C or SIGTERM; print `ready_line` once it answers."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # The server runs in its own process group (so `stop` reaches its workers), which
    # also keeps the terminal's Ctrl-C from it: this process turns both into `stop`.
    previous = {
        signum: signal.signal(signum, terminate) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    process = None
    quiet = startup.stderr_filter()  # the model server's workers load TensorFlow
    try:
        process = start(command, stderr=None if quiet is None else quiet.stdin)
        elapsed = wait_until_ready(process, command.ready_url)
        print(f"{name}: {ready_line} (ready in {elapsed:.1f} s; Ctrl-C stops it)", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        print(f"{name}: stopping", file=sys.stderr)
        return 0
    finally:
        if process is not None:
            stop(process)
        startup.end_filter(quiet)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
