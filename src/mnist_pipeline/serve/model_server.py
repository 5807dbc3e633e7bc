"""Serve the champion over REST with MLflow's scoring app, on loopback by default.

`model_server_command` builds the exact command line for `models:/<registered_model>@champion`
of this repository's store: uvicorn running `scoring_app` (MLflow's own scoring app, what
`mlflow models serve` runs, behind `guard`, which answers the bad requests MLflow gets wrong
with a 4xx); `plain=True` gives `mlflow models serve` itself. `python -m
mnist_pipeline.serve.model_server` (`make serve`) runs it in the foreground and prints the URL
once the model answers `/ping`. The same small process helpers (start, wait until ready, stop)
run the tracking UI (`ui`). Nothing here imports MLflow: the server is a subprocess.

Send digits as uint8 pixel values (integers 0..255), shape (N, 28, 28):

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"inputs": [[[0, 0, ...], ...]]}'
    ->  {"predictions": [[p0, ..., p9]], "unsure": [false]}

The probabilities are calibrated (the temperature fitted on the validation split travels with
the model version); `unsure` marks answers below the version's abstention threshold.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .. import startup
from ..config import TrackingConfig
from ..config.loading import tracking_config
from ..errors import ModelError, ServerError, reported
from ..tracking import logged_models, registry, store
from .guard import DEFAULT_MAX_BODY_BYTES, Guard, RequestRefused
from .process import (
    DEFAULT_WORKERS,
    ServerCommand,
    check_address,
    run_foreground,
    server_path,
    url_for,
)

DEFAULT_HOST = "127.0.0.1"  # loopback: nothing outside this machine can reach the server
DEFAULT_PORT = 5001         # the tracking UI takes MLflow's usual 5000


REQUEST_TIMEOUT_S = 60
# How `model_server_command` tells `scoring_app` (in the server's workers) what to serve.
MODEL_URI_ENV = "MNIST_SERVE_MODEL_URI"
MAX_BODY_ENV = "MNIST_SERVE_MAX_BODY_BYTES"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # read by MLflow's scoring app


def require_store(tracking_cfg: TrackingConfig) -> str:
    """The store's URI; for the default SQLite store, fail if the pipeline has not made it yet
    (opening a missing SQLite store would create an empty one)."""
    uri = store.tracking_uri(tracking_cfg)
    if store.not_created(uri):
        raise ServerError(f"no tracking store at {uri}: run the pipeline first (dvc repro)")
    return uri


def require_champion(tracking_cfg: TrackingConfig) -> None:
    """Fail with what to do when no version holds the `champion` alias yet."""
    require_store(tracking_cfg)
    store.use_store(tracking_cfg)
    name = tracking_cfg.registered_model
    if registry.champion(name) is None:
        raise ServerError(f"no version of '{name}' is '{registry.CHAMPION}' yet: the evaluate "
                          "stage moves the alias when a model passes the gate (dvc repro); "
                          f"or serve a version: --model-uri models:/{name}/<version>")


# --- the model server ----------------------------------------------------------------------

def model_server_command(tracking_cfg: TrackingConfig, *, model_uri: str | None = None,
                         host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                         workers: int = DEFAULT_WORKERS, timeout_s: int = REQUEST_TIMEOUT_S,
                         max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                         plain: bool = False) -> ServerCommand:
    """The server for `model_uri` (default: the champion) from this repo's store.

    The model runs in this virtual environment, which holds exactly the versions it was
    logged with (no network, no new environment to build). `plain`: `mlflow models serve
    --env-manager local` itself, without `guard` (and so without its 4xx answers and body limit).
    """
    warnings = check_address(host, port, workers)
    if max_body_bytes < 1:
        raise ServerError(f"--max-body-bytes: got {max_body_bytes}, expected an integer >= 1")
    uri = model_uri or registry.champion_uri(tracking_cfg.registered_model)
    address = ["--host", host, "--port", str(port), "--workers", str(workers)]
    if plain:
        argv = [sys.executable, "-m", "mlflow", "models", "serve", "--model-uri", uri,
                *address, "--timeout", str(timeout_s), "--env-manager", "local"]
    else:
        argv = [sys.executable, "-m", "uvicorn", "--factory",
                "mnist_pipeline.serve.model_server:scoring_app", *address]
    base = url_for(host, port)
    return ServerCommand(
        argv=argv,
        # `models:/` URIs resolve in the registry of this store.
        env_overrides={"MLFLOW_TRACKING_URI": store.tracking_uri(tracking_cfg),
                       "PATH": server_path(),
                       **({} if plain else {MODEL_URI_ENV: uri,
                                            MAX_BODY_ENV: str(max_body_bytes),
                                            TIMEOUT_ENV: str(timeout_s)}),
                       # Its workers load TensorFlow and fetch the model: the same quiet
                       # start-up as a stage's.
                       **startup.quiet_env()},
        url=f"{base}/invocations", ready_url=f"{base}/ping", warnings=warnings)


def scoring_app() -> Guard:
    """The ASGI app each server worker runs (uvicorn --factory): MLflow's scoring app for
    $MNIST_SERVE_MODEL_URI behind `guard`, which answers well-formed batches with the same
    pyfunc model."""
    app, model = logged_models.scoring_app(os.environ[MODEL_URI_ENV])

    def predict(images: np.ndarray) -> np.ndarray:
        try:
            return model.predict(images)
        except ModelError as err:
            raise RequestRefused(400, str(err)) from None

    return Guard(app, predict,
                 max_body_bytes=int(os.environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY_BYTES),
                 threshold=model.threshold)


# --- entrypoint ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.serve.model_server",
        description="Serve the champion model (or --model-uri) over REST with MLflow's "
                    "model server.")
    parser.add_argument("--model-uri", help="default: models:/<tracking.registered_model>"
                                            "@champion from params.yaml")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="larger request bodies get 413 (default "
                             f"{DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--plain", action="store_true",
                        help="run `mlflow models serve` itself, without the request checks")
    parser.add_argument("--print-command", action="store_true",
                        help="print the command line and exit")
    args = parser.parse_args(argv)
    with reported("serve"):
        cfg = tracking_config()
        command = model_server_command(cfg, model_uri=args.model_uri, host=args.host,
                                       port=args.port, workers=args.workers,
                                       max_body_bytes=args.max_body_bytes, plain=args.plain)
        for warning in command.warnings:
            print(f"serve: WARNING: {warning}", file=sys.stderr)
        if args.print_command:
            print(command.shell())
            return 0
        if args.model_uri is None:
            require_champion(cfg)
        else:
            require_store(cfg)
        model = args.model_uri or registry.champion_uri(cfg.registered_model)
        print(f"serve: starting MLflow's scoring server for {model} "
              f"(store {store.tracking_uri(cfg)})", flush=True)
        return run_foreground(command, "serve",
                              f"{model} answers POST {command.url}")
    return 1  # unreachable: `reported` exits on failure


if __name__ == "__main__":
    sys.exit(main())
