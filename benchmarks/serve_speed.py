"""Serving speed: MLflow's Keras flavour (as models were logged before) against the served pyfunc.

    python benchmarks/serve_speed.py --model mlp=models/model.keras --model cnn=cnn.keras
    python benchmarks/serve_speed.py --model cnn=cnn.keras --soak 10000     # and a soak

For each `.keras` file it logs the model twice into a throwaway SQLite store, with MLflow's
Keras flavour (`logged_models.log_keras_flavour`) and as the served pyfunc
(`logged_models.log_keras_model`, what the train stage logs), and serves each with the same
commands: `mlflow models serve` (`--plain`, what `make serve` ran before) and `make serve`'s
server (MLflow's scoring app behind `serve/guard.py`). The same clients then measure, on
real test images (data/processed): one client sending single images,
8 concurrent clients sending single images, one client sending batches of 256. Printed per
server: start-up time (until /ping answers), p50/p99 latency, requests/s, images/s, errors,
and the server's resident memory (its whole process tree). `--soak N` then sends N single
images from 16 clients to `make serve`'s server of each model and prints the latency and the
memory after each thousand. Nothing is asserted. Run it when the machine is quiet (`uptime`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnist_pipeline.config.loading import tracking_config  # noqa: E402
from mnist_pipeline.data.splits import load_split  # noqa: E402
from mnist_pipeline.serve import load  # noqa: E402
from mnist_pipeline.serve.model_server import model_server_command  # noqa: E402
from mnist_pipeline.serve.process import start, stop, wait_until_ready  # noqa: E402

SERVERS = (("keras flavour", "keras", True),     # what `make serve` answered with before
           ("pyfunc", "pyfunc", True),           # the served model, `mlflow models serve`
           ("pyfunc + guard", "pyfunc", False))  # the served model, `make serve`'s server


def test_images(data: Path, n: int) -> np.ndarray:
    if not (data / "test.npz").is_file():
        raise SystemExit(f"serve_speed: no {data / 'test.npz'}: run dvc repro preprocess")
    return load_split(data, "test").images[:n]


def bodies(images: np.ndarray, batch: int) -> tuple[list[bytes], list[bytes]]:
    singles = [json.dumps({"inputs": images[i:i + 1].tolist()}).encode() for i in range(64)]
    batches = [json.dumps({"inputs": images[i:i + batch].tolist()}).encode()
               for i in range(0, 4 * batch, batch)]
    return singles, batches


def log_both(keras_file: Path, store_dir: Path) -> dict[str, str]:
    """The model logged with each flavour in a fresh SQLite store; their `models:/` URIs."""
    import mlflow

    from mnist_pipeline.tracking import logged_models
    from mnist_pipeline.training import models

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store_dir / 'mlflow.db'}"
    # Artifacts beside the throwaway store, not in ./mlruns (MLflow's default for SQLite).
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "serve-speed", artifact_location=(store_dir / "artifacts").as_uri()))
    model = models.load(keras_file)
    with mlflow.start_run():
        return {"keras": logged_models.log_keras_flavour(model),
                "pyfunc": logged_models.log_keras_model(model)}


def line(label: str, result: load.Result, images_per_request: int = 1) -> str:
    per_s = result.per_s()
    return (f"    {label:<22} p50 {result.quantile_ms(0.5):8.1f} ms  p99 "
            f"{result.quantile_ms(0.99):8.1f} ms  {per_s:8.1f} req/s  "
            f"{per_s * images_per_request:9.0f} images/s  errors {result.failed}"
            + (f"  {result.errors[0]}" if result.errors else ""))


def measure(url: str, singles: list[bytes], batches: list[bytes], args, slow: bool,
            pid: int) -> None:
    scale = 0.1 if slow else 1.0  # the Keras flavour answers ~20x slower: fewer requests
    load.run_clients(url, singles, 20, 1)  # warm-up
    rows = [("1 client, 1 image", load.run_clients(url, singles, int(args.single * scale), 1), 1),
            (f"{args.clients} clients, 1 image",
             load.run_clients(url, singles, int(args.concurrent * scale), args.clients), 1),
            (f"1 client, {args.batch} images",
             load.run_clients(url, batches, max(3, int(args.batches * scale)), 1), args.batch)]
    for label, result, per_request in rows:
        print(line(label, result, per_request), flush=True)
    print(f"    server RSS {load.tree_rss_bytes(pid) / 2**20:.0f} MiB", flush=True)


def soak(url: str, singles: list[bytes], n: int, pid: int) -> None:
    rss: list[int] = []
    marks: list[float] = [time.perf_counter()]

    def sample(done: int) -> None:
        rss.append(load.tree_rss_bytes(pid))
        marks.append(time.perf_counter())
        print(f"      {done:6d} requests: RSS {rss[-1] / 2**20:.1f} MiB, last thousand at "
              f"{1000 / (marks[-1] - marks[-2]):.0f} req/s", flush=True)

    result = load.run_clients(url, singles, n, 16, every=1000, on_every=sample)
    print(line("soak, 16 clients", result), flush=True)
    if len(rss) >= 2:
        print(f"    RSS first -> last thousand: {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB "
              f"({100 * (rss[-1] / rss[0] - 1):+.1f}%)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FILE.keras")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--single", type=int, default=1000, help="requests, one client")
    parser.add_argument("--concurrent", type=int, default=3000, help="requests, all clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="batch requests")
    parser.add_argument("--soak", type=int, default=0, help="requests, 16 clients")
    parser.add_argument("--servers", default="keras flavour,pyfunc,pyfunc + guard")
    args = parser.parse_args()
    wanted = args.servers.split(",")
    images = test_images(args.data, 4 * args.batch)
    singles, batches = bodies(images, args.batch)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs; {len(images)} test images")
    for spec in args.model:
        name, _, path = spec.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            uris = log_both(Path(path), Path(tmp))
            cfg = tracking_config(ROOT)
            for label, flavour, plain in SERVERS:
                if label not in wanted:
                    continue
                port = load_port()
                command = model_server_command(cfg, model_uri=uris[flavour], port=port,
                                               plain=plain)
                with open(Path(tmp) / f"{flavour}-{plain}.log", "wb") as log:
                    process = start(command, log=log)
                    try:
                        ready_s = wait_until_ready(process, command.ready_url)
                        print(f"{name}: {label} ({'mlflow models serve' if plain else 'make serve'}"
                              f"), ready in {ready_s:.1f} s", flush=True)
                        measure(command.url, singles, batches, args, flavour == "keras",
                                process.pid)
                        if args.soak and not plain:
                            soak(command.url, singles, args.soak, process.pid)
                    finally:
                        stop(process)
    print(f"load average {os.getloadavg()}")
    return 0


def load_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
