"""The MLflow UI on this repository's own tracking store, on loopback by default.

`server_command` builds the exact `mlflow server` command line from the tracking config
and the project root: the store the pipeline writes (`mlflow.db` at the root, or
`MLFLOW_TRACKING_URI` / `tracking.uri`), artifacts proxied to the folder the pipeline
writes them to (`<artifact_dir>` beside a SQLite store), one uvicorn worker, bound to
127.0.0.1, and an explicit Host-header allow-list (MLflow's DNS-rebinding protection), so a
request naming any other host gets 403. `python -m mnist_pipeline.serve.ui` (`make ui`) runs it
and prints the URL once it answers.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import project
from ..config import TrackingConfig
from ..config.loading import tracking_config
from ..errors import ServerError, reported
from ..tracking import store
from .process import (
    DEFAULT_WORKERS,
    WILDCARDS,
    ServerCommand,
    authority,
    check_address,
    run_foreground,
    server_path,
    url_for,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
REMOTE_STORES = ("http://", "https://", "databricks")


def allowed_hosts(host: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`Host` header values the server accepts: loopback names at this port, the bound
    address when it is a specific one, and `extra` (names or MLflow wildcard patterns)."""
    names = [f"{name}:{port}" for name in LOOPBACK_NAMES]
    if host not in (*LOOPBACK_NAMES, *WILDCARDS):
        names.append(authority(host, port))
    for name in extra:
        if name == "*":
            raise ServerError(
                "--allowed-hosts: '*' would accept any Host header (DNS "
                "rebinding); list the names clients use, e.g. mlflow.lan:5000"
            )
        if name and name not in names:
            names.append(name)
    return names


def server_command(
    tracking_cfg: TrackingConfig,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = DEFAULT_WORKERS,
    extra_hosts: tuple[str, ...] = (),
) -> ServerCommand:
    """`mlflow server` on the repository's store; see the module docstring."""
    store_uri = store.tracking_uri(tracking_cfg)
    if store_uri.startswith(REMOTE_STORES):
        raise ServerError(
            f"the tracking store is already a server ({store_uri}): open it in a "
            "browser instead of starting another one"
        )
    # Where the pipeline puts the artifacts of this store (beside a SQLite file); for
    # another database, `<repository root>/<artifact_dir>`.
    artifacts = (
        store.artifact_dir(store_uri, tracking_cfg) or project.root() / tracking_cfg.artifact_dir
    )
    return tracking_server_command(
        store_uri, artifacts, host=host, port=port, workers=workers, extra_hosts=extra_hosts
    )


def tracking_server_command(
    backend_uri: str,
    artifacts: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    workers: int = DEFAULT_WORKERS,
    extra_hosts: tuple[str, ...] = (),
) -> ServerCommand:
    """`mlflow server` on the database `backend_uri`, storing the artifacts clients upload
    through it in the folder `artifacts` (proxied: clients need no access to that folder)."""
    warnings = check_address(host, port, workers)
    hosts = allowed_hosts(host, port, extra_hosts)
    if host in WILDCARDS and not extra_hosts:
        warnings.append(
            f"only Host headers {', '.join(hosts)} are accepted; add the names "
            "remote clients use with --allowed-hosts"
        )
    origins = [f"http://{name}" for name in hosts if "*" not in name]
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        # Runs logged through this server (MLFLOW_TRACKING_URI=<url>) store artifacts
        # here; existing runs keep the locations they were logged with.
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        # uvicorn (MLflow's default server, the only one that applies --allowed-hosts),
        # with few workers instead of MLflow's four: a small machine.
        "--workers",
        str(workers),
        "--allowed-hosts",
        ",".join(hosts),
        "--cors-allowed-origins",
        ",".join(origins),
    ]
    return ServerCommand(
        argv=argv,
        # No background job runner (GenAI scorers, trace roll-ups): two fewer processes.
        env_overrides={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": server_path()},
        url=url_for(host, port),
        ready_url=f"{url_for(host, port)}/health",
        warnings=warnings,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.serve.ui",
        description="The MLflow UI on this repository's tracking store and artifacts.",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="extra comma-separated Host header values to accept "
        "(needed with --host 0.0.0.0), e.g. mlflow.lan:5000",
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the command line and exit"
    )
    args = parser.parse_args(argv)
    with reported("ui"):
        cfg = tracking_config()
        store_uri = store.tracking_uri(cfg)
        if store_uri.startswith(("http://", "https://")):
            # A team's tracking server is its own UI: nothing to start here.
            print(
                f"ui: the tracking store is the server {store_uri}: open {store_uri} in a browser"
            )
            return 0
        extra = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip())
        command = server_command(
            cfg, host=args.host, port=args.port, workers=args.workers, extra_hosts=extra
        )
        for warning in command.warnings:
            print(f"ui: WARNING: {warning}", file=sys.stderr)
        if args.print_command:
            print(command.shell())
            return 0
        print(f"ui: starting the MLflow UI on {store.tracking_uri(cfg)}", flush=True)
        return run_foreground(command, "ui", f"MLflow UI at {command.url}")
    return 1  # not reached: `reported` exits on a PipelineError


if __name__ == "__main__":
    sys.exit(main())
