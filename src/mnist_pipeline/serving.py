"""Serve the champion over REST with MLflow's model server, on loopback by default.

`model_server_command` builds the exact `mlflow models serve` command line for
`models:/<registered_model>@champion` of this repository's store; `python -m
mnist_pipeline.serving` (`make serve`) runs it in the foreground and prints the URL once the
model answers `/ping`. The same small process helpers (start, wait until ready, stop)
run the tracking UI (`ui`). Nothing here imports MLflow: the server is a subprocess.

Send digits as uint8 pixel values (integers 0..255), shape (N, 28, 28):

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[0, 0, ...], ...]]}'      ->  {"predictions": [[p0, ..., p9]]}
"""

from __future__ import annotations

import argparse
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

import yaml

from . import config, project, tracking
from .config import TrackingConfig
from .errors import PipelineError, reported

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing outside this machine can reach the server
DEFAULT_PORT = 5001         # the tracking UI takes MLflow's usual 5000
# One worker: a small model on a small machine; each worker loads its own copy of the model
# (and of TensorFlow), so more workers mostly cost memory.
DEFAULT_WORKERS = 1
REQUEST_TIMEOUT_S = 60
READY_TIMEOUT_S = 300       # loading TensorFlow and the model takes ~30 s on 2 busy cores
PARAMS_FILE = "params.yaml"
WILDCARDS = ("0.0.0.0", "::", "[::]")  # bind addresses meaning "every interface"


class ServerError(PipelineError):
    """A server could not be configured, started, or did not become ready."""


@dataclass(frozen=True)
class ServerCommand:
    """A server's exact command line, the environment it runs with, and where it answers."""

    argv: list[str]
    env_overrides: dict[str, str]  # set on top of the caller's environment
    url: str                       # what a person opens or calls
    ready_url: str                 # answers HTTP 200 once the server can do its job
    warnings: list[str] = field(default_factory=list)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env_overrides}

    def shell(self) -> str:
        """The command as one line a person can paste into a shell."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env_overrides.items())
                       if k != "PATH"]
        return " ".join([*assignments, shlex.join(self.argv)])


# --- config --------------------------------------------------------------------------------

def tracking_config(root: str | os.PathLike[str] | None = None) -> TrackingConfig:
    """The `tracking` section of `<repo root>/params.yaml` (defaults when there is none).

    The servers and `mnist-predict` run outside DVC, so they read the composed params.yaml
    the stages read, not `conf/`.
    """
    path = Path(root) if root is not None else project.root()
    params = path / PARAMS_FILE
    if not params.is_file():
        return TrackingConfig()
    try:
        raw = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ServerError(f"{params}: not valid YAML ({err}); recompose it: make params") from None
    if "tracking" not in raw:
        return TrackingConfig()
    return config.section(raw, "tracking")


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
    return [f"binding {host}:{port} exposes this server to every network that can reach this "
            "machine, with no authentication; use the default 127.0.0.1 unless you mean it"]


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


def require_store(tracking_cfg: TrackingConfig) -> str:
    """The store's URI; for the default SQLite store, fail if the pipeline has not made it yet
    (opening a missing SQLite store would create an empty one)."""
    uri = tracking.tracking_uri(tracking_cfg)
    database = tracking.sqlite_file(uri)
    if database is not None and not database.is_file():
        raise ServerError(f"no tracking store at {uri}: run the pipeline first (dvc repro)")
    return uri


def require_champion(tracking_cfg: TrackingConfig) -> None:
    """Fail with what to do when no version holds the `champion` alias yet."""
    require_store(tracking_cfg)
    tracking.use_store(tracking_cfg)
    name = tracking_cfg.registered_model
    if tracking.champion(name) is None:
        raise ServerError(f"no version of '{name}' is '{tracking.CHAMPION}' yet: the evaluate "
                          "stage moves the alias when a model passes the gate (dvc repro); "
                          f"or serve a version: --model-uri models:/{name}/<version>")


def server_path() -> str:
    """PATH with this interpreter's folder first: MLflow starts `uvicorn` by name."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# --- the model server ----------------------------------------------------------------------

def model_server_command(tracking_cfg: TrackingConfig, *, model_uri: str | None = None,
                         host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                         workers: int = DEFAULT_WORKERS,
                         timeout_s: int = REQUEST_TIMEOUT_S) -> ServerCommand:
    """`mlflow models serve` for `model_uri` (default: the champion) from this repo's store.

    `--env-manager local`: the model runs in this virtual environment, which holds exactly
    the versions it was logged with (no network, no new environment to build).
    """
    warnings = check_address(host, port, workers)
    uri = model_uri or tracking.champion_uri(tracking_cfg.registered_model)
    argv = [sys.executable, "-m", "mlflow", "models", "serve",
            "--model-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout", str(timeout_s), "--env-manager", "local"]
    base = url_for(host, port)
    return ServerCommand(
        argv=argv,
        # `models:/` URIs resolve in the registry of this store.
        env_overrides={"MLFLOW_TRACKING_URI": tracking.tracking_uri(tracking_cfg),
                       "PATH": server_path()},
        url=f"{base}/invocations", ready_url=f"{base}/ping", warnings=warnings)


# --- running a server (shared with `ui`) ---------------------------------------------------

def start(command: ServerCommand, *, log: IO[bytes] | None = None,
          cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """Start the server in its own process group, so `stop` ends it and its workers together."""
    try:
        return subprocess.Popen(command.argv, env=command.env(), cwd=cwd,
                                stdout=log, stderr=subprocess.STDOUT if log else None,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        raise ServerError(f"could not start {command.argv[0]}: {err}") from None


def wait_until_ready(process: subprocess.Popen, url: str,
                     timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll `url` until it answers 200; return the seconds waited.

    Fails at once if the server exits (a port already in use, a missing model, a broken store).
    """
    started = time.monotonic()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    while True:
        code = process.poll()
        if code is not None:
            raise ServerError(f"the server exited with status {code} before {url} answered "
                              "(see its output above)")
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
    previous = {signum: signal.signal(signum, terminate)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    process = None
    try:
        process = start(command)
        elapsed = wait_until_ready(process, command.ready_url)
        print(f"{name}: {ready_line} (ready in {elapsed:.1f} s; Ctrl-C stops it)", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        print(f"{name}: stopping", file=sys.stderr)
        return 0
    finally:
        if process is not None:
            stop(process)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- entrypoint ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.serving",
        description="Serve the champion model (or --model-uri) over REST with MLflow's "
                    "model server.")
    parser.add_argument("--model-uri", help="default: models:/<tracking.registered_model>"
                                            "@champion from params.yaml")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--print-command", action="store_true",
                        help="print the command line and exit")
    args = parser.parse_args(argv)
    with reported("serve"):
        cfg = tracking_config()
        command = model_server_command(cfg, model_uri=args.model_uri, host=args.host,
                                       port=args.port, workers=args.workers)
        for warning in command.warnings:
            print(f"serve: WARNING: {warning}", file=sys.stderr)
        if args.print_command:
            print(command.shell())
            return 0
        if args.model_uri is None:
            require_champion(cfg)
        else:
            require_store(cfg)
        model = command.argv[command.argv.index("--model-uri") + 1]
        print(f"serve: starting MLflow's model server for {model} "
              f"(store {tracking.tracking_uri(cfg)})", flush=True)
        return run_foreground(command, "serve",
                              f"{model} answers POST {command.url}")
    return 1  # unreachable: `reported` exits on failure


if __name__ == "__main__":
    sys.exit(main())
