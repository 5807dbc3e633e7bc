"""Serve the champion over REST on loopback by default: its ONNX export in ONNX Runtime, without
TensorFlow or MLflow in the server's process.

`model_server_command` finds the served artifacts of `models:/<registered_model>@champion`
(or `--model-uri`) in this repository's store (`tracking/served_artifacts.py`) and builds
the command line: uvicorn running `app.create` (MLflow's scoring protocol, request checks,
micro-batching) on that folder. `mlflow=True` gives `mlflow models serve` itself on the same
logged model (its pyfunc runs the same ONNX export; MLflow's request handling, no guard).
`python -m mnist_pipeline.serve.model_server` (`make serve`) runs it in the foreground and
prints the URL once the model answers `/ping`. The same small process helpers (start, wait
until ready, stop) run the tracking UI (`ui`).

Send digits as uint8 pixel values (integers 0..255), shape (N, 28, 28):

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[0, 0, ...], ...]]}'
    ->  {"predictions": [[p0, ..., p9]], "unsure": [false]}

The probabilities are calibrated (the temperature fitted on the validation split travels with
the model version); `unsure` marks answers below the version's abstention threshold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from ..config import MonitoringConfig, TrackingConfig
from ..config.loading import checkout_section, tracking_config
from ..errors import ModelError, ServerError, reported
from ..tracking import registry, served_artifacts, store
from . import app
from .batching import DEFAULT_MAX_IMAGES, DEFAULT_MAX_WAIT_S
from .guard import DEFAULT_MAX_BODY_BYTES
from .process import (
    DEFAULT_WORKERS,
    ServerCommand,
    check_address,
    run_foreground,
    server_path,
    url_for,
)

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing outside this machine can reach the server
DEFAULT_PORT = 5001  # the tracking UI takes MLflow's usual 5000
REQUEST_TIMEOUT_S = 60  # MLflow's server (--mlflow) only


def require_store(tracking_cfg: TrackingConfig) -> str:
    """The store's URI; for the default SQLite store, fail if the pipeline has not made it yet
    (opening a missing SQLite store would create an empty one)."""
    uri = store.tracking_uri(tracking_cfg)
    if store.not_created(uri):
        raise ServerError(f"no tracking store at {uri}: run the pipeline first (dvc repro)")
    return uri


def champion_hint(tracking_cfg: TrackingConfig) -> str:
    name = tracking_cfg.registered_model
    return (
        f"the evaluate stage moves the alias when a model passes the gate (dvc repro); "
        f"or serve a version: --model-uri models:/{name}/<version>"
    )


# --- the model server ----------------------------------------------------------------------


def model_server_command(
    tracking_cfg: TrackingConfig,
    *,
    model_uri: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = DEFAULT_WORKERS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch: int = DEFAULT_MAX_IMAGES,
    max_wait_ms: int = round(DEFAULT_MAX_WAIT_S * 1000),
    mlflow: bool = False,
    cache: str | None = None,
    served: served_artifacts.Served | None = None,
    monitoring: MonitoringConfig | None = None,
    int8: bool = False,
) -> ServerCommand:
    """The server for `model_uri` (default: the champion) from this repo's store.

    The served artifacts are found now (downloaded into `cache`, a new temporary folder by
    default, when they are not on this disk), unless `served` says where they are.
    `mlflow`: `mlflow models serve --env-manager
    local` on the logged model instead, without this server's request checks, limits and
    batching. `monitoring`: where and how the server logs what it answers (no log without
    it, or with `log_requests: false`); /metrics is served either way. `int8`: serve the
    version's int8 graph, which the gate must have found servable (its `gate.int8.servable`
    tag) when the artifacts are found here; a caller that passes `served` has vetted them.
    """
    warnings = check_address(host, port, workers)
    if max_body_bytes < 1:
        raise ServerError(f"--max-body-bytes: got {max_body_bytes}, expected an integer >= 1")
    if max_batch < 1 or not 0 <= max_wait_ms <= 1000:
        raise ServerError(
            f"--max-batch {max_batch}, --max-wait-ms {max_wait_ms}: expected "
            "a batch of at least 1 image and a wait of 0 to 1000 ms"
        )
    if int8 and mlflow:
        raise ServerError(
            "--int8 with --mlflow: MLflow's server runs the float32 graph; leave out one of them"
        )
    uri = model_uri or registry.champion_uri(tracking_cfg.registered_model)
    address = ["--host", host, "--port", str(port), "--workers", str(workers)]
    base = url_for(host, port)
    env = {"PATH": server_path()}
    if mlflow:
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "--model-uri",
            uri,
            *address,
            "--timeout",
            str(REQUEST_TIMEOUT_S),
            "--env-manager",
            "local",
        ]
        # `models:/` URIs resolve in the registry of this store.
        env["MLFLOW_TRACKING_URI"] = store.tracking_uri(tracking_cfg)
    else:
        try:
            if served is None:
                served = served_artifacts.locate(
                    tracking_cfg, uri, cache or tempfile.mkdtemp(prefix="mnist-serve-")
                )
                if int8:
                    served_artifacts.require_int8_servable(tracking_cfg, served, uri)
        except ModelError as err:
            hint = f": {champion_hint(tracking_cfg)}" if model_uri is None else ""
            raise ServerError(f"{err}{hint}") from None
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"{app.__name__}:create",
            *address,
            "--no-access-log",
        ]
        env.update(
            {
                app.MODEL_DIR_ENV: str(served.folder),
                app.MODEL_NAME_ENV: served.name,
                app.MODEL_VERSION_ENV: served.version,
                app.MAX_BODY_ENV: str(max_body_bytes),
                app.MAX_BATCH_ENV: str(max_batch),
                app.MAX_WAIT_ENV: str(max_wait_ms),
                app.PRECISION_ENV: "int8" if int8 else "float32",
            }
        )
        if monitoring is not None and monitoring.log_requests:
            from ..monitoring import requestlog  # SQLAlchemy: only for a server that logs

            env.update(
                {
                    app.LOG_ENV: requestlog.log_url(monitoring.log),
                    app.LOG_MAX_ROWS_ENV: str(monitoring.max_rows),
                    app.LOG_FLUSH_ENV: repr(monitoring.flush_interval_s),
                    app.LOG_IMAGES_ENV: repr(monitoring.image_sample_rate),
                }
            )
    return ServerCommand(
        argv=argv,
        env_overrides=env,
        url=f"{base}/invocations",
        ready_url=f"{base}/ping",
        warnings=warnings,
    )


# --- entrypoint ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.serve.model_server",
        description="Serve the champion model (or --model-uri) over REST: its ONNX export "
        "in ONNX Runtime, MLflow's scoring protocol.",
    )
    parser.add_argument(
        "--model-uri", help="default: models:/<tracking.registered_model>@champion from params.yaml"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}: this machine only)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"larger request bodies get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help=f"images per model call at most (default {DEFAULT_MAX_IMAGES})",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=int,
        default=round(DEFAULT_MAX_WAIT_S * 1000),
        help="how long a batch waits for a request being read (default "
        f"{round(DEFAULT_MAX_WAIT_S * 1000)} ms)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="serve the version's int8 graph (1.7x the images/s of a CNN in batches); the "
        "gate must have found it servable: accuracy within 0.2 points of the Keras model's, "
        "labels agreeing on 99.5%% of the test images",
    )
    parser.add_argument(
        "--no-log",
        action="store_true",
        help="do not record answered requests in the request log "
        "(params.yaml: monitoring.log_requests)",
    )
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="run `mlflow models serve` on the logged model instead, without "
        "this server's checks, limits and batching",
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the command line and exit"
    )
    args = parser.parse_args(argv)
    with reported("serve"):
        cfg = tracking_config()
        require_store(cfg)
        monitoring = None if args.no_log else checkout_section("monitoring")
        command = model_server_command(
            cfg,
            model_uri=args.model_uri,
            host=args.host,
            port=args.port,
            workers=args.workers,
            max_body_bytes=args.max_body_bytes,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            mlflow=args.mlflow,
            monitoring=monitoring,
            int8=args.int8,
        )
        for warning in command.warnings:
            print(f"serve: WARNING: {warning}", file=sys.stderr)
        if args.print_command:
            print(command.shell())
            return 0
        model = args.model_uri or registry.champion_uri(cfg.registered_model)
        env = command.env_overrides
        what = (
            "MLflow's model server"
            if args.mlflow
            else f"version {env[app.MODEL_VERSION_ENV]} of {env[app.MODEL_NAME_ENV]} "
            f"(ONNX Runtime, {env[app.PRECISION_ENV]})"
        )
        print(f"serve: starting {what} for {model} (store {store.tracking_uri(cfg)})", flush=True)
        if app.LOG_ENV in env:
            from ..monitoring import requestlog

            print(
                f"serve: logging answers to {requestlog.display(env[app.LOG_ENV])}; "
                f"metrics at {command.url.rsplit('/', 1)[0]}/metrics",
                flush=True,
            )
        return run_foreground(command, "serve", f"{model} answers POST {command.url}")
    return 1  # unreachable: `reported` exits on failure


if __name__ == "__main__":
    sys.exit(main())
