"""Serving speed: the ONNX model server against the TensorFlow pyfunc it replaced, and against
an echo server that marks what HTTP alone costs on this machine.

    python benchmarks/serve_speed.py --model mlp=mlp.keras --model best=best.keras
    python benchmarks/serve_speed.py --model best=best.keras --soak 10000   # and a soak

For each `.keras` file, in a throwaway SQLite store, the model is logged twice: as the train
stage logs it now (its ONNX export and the int8 graph quantized on the validation split,
`training.job.log_served`) and as the TensorFlow pyfunc `make serve` served before
(`benchmarks/tf_pyfunc.py`, a `tf.function` over the `.keras` file). Four servers, one
worker each, on loopback, each started and measured in turn:

- echo: `benchmarks/echo_app.py` under the same uvicorn: reads the body, answers a fixed
  document. The HTTP ceiling.
- tf pyfunc: `mlflow models serve` on the TensorFlow pyfunc (MLflow's request parsing; the
  earlier `make serve` put a guard in front that parsed well-formed batches itself).
- onnx: `make serve`'s server (`serve/app.py`) on the ONNX export, micro-batching on.
- onnx int8: the same server on the int8 graph (`make serve ARGS=--int8`).

The same clients (`serve/load.py`: keep-alive connections, one thread each, bodies encoded
before the clock starts) send real test images (data/processed): one client with single
images, 8 clients with single images, one client with batches of 256. Printed per server:
time from process start to the first 200 on /ping, p50/p99 latency, requests/s, images/s,
errors, resident memory; then the ratios of the onnx servers to the echo (the targets) and
to the tf pyfunc. The targets again with the echo and the onnx server both running,
measured in turns (`--rounds`), the median of each turn's ratio: the machine's drift
between two measurements moves these ratios by more than their margins. A third server runs
in those turns: the onnx server whose model call costs nothing (`no_model_app.py`), the floor
under any model's figures. Then what the
request log costs: the onnx server without and with it (`monitoring.log`, SQLite), both
running, measured in turns (`--log-rounds`), medians of single-image p50 and 8-client
req/s. Then `mnist-predict` on one picture, against loading the TensorFlow pyfunc for one
picture, each a fresh process timed from its start. `--soak N` sends N single images from
16 clients to the onnx server and prints its memory after every thousand. Nothing is
asserted; run it when the machine is quiet (`uptime` is printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))

from mnist_pipeline.config.loading import tracking_config  # noqa: E402
from mnist_pipeline.data.splits import load_split  # noqa: E402
from mnist_pipeline.serve import app, load  # noqa: E402
from mnist_pipeline.serve.model_server import model_server_command  # noqa: E402
from mnist_pipeline.serve.process import ServerCommand, server_path, start, stop, url_for  # noqa: E402
from mnist_pipeline.tracking import served_artifacts  # noqa: E402
from mnist_pipeline.tracking.mnist_onnx import INT8_FILE  # noqa: E402

SERVERS = ("echo", "tf pyfunc", "onnx", "onnx int8")
REGISTERED = "serve-speed"


def test_images(data: Path, n: int) -> np.ndarray:
    if not (data / "test.npz").is_file():
        raise SystemExit(f"serve_speed: no {data / 'test.npz'}: run dvc repro preprocess")
    return load_split(data, "test").images[:n]


def bodies(images: np.ndarray, batch: int) -> tuple[list[bytes], list[bytes]]:
    singles = [json.dumps({"inputs": images[i : i + 1].tolist()}).encode() for i in range(64)]
    batches = [
        json.dumps({"inputs": images[i : i + batch].tolist()}).encode()
        for i in range(0, 4 * batch, batch)
    ]
    return singles, batches


def log_both(keras_file: Path, store_dir: Path, val_images: np.ndarray) -> dict[str, str]:
    """The model as the train stage logs it (ONNX, and its int8 graph quantized on
    `val_images`) and as the TensorFlow pyfunc, registered as versions 1 and 2 of REGISTERED
    in a fresh SQLite store; their version URIs."""
    import mlflow

    from mnist_pipeline.tracking import logged_models, registry
    from mnist_pipeline.training import calibration, job, models

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store_dir / 'mlflow.db'}"
    # Artifacts beside the throwaway store, not in ./mlruns (MLflow's default for SQLite).
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment(
            "serve-speed", artifact_location=(store_dir / "artifacts").as_uri()
        )
    )
    model = models.load(keras_file)
    keras_copy = store_dir / "model.keras"
    model.save(keras_copy)
    with mlflow.start_run():
        onnx_uri = job.log_served(model, calibration.IDENTITY, int8_images=val_images)
        tf_uri = mlflow.pyfunc.log_model(
            name="tf-pyfunc",
            python_model=str(BENCHMARKS / "tf_pyfunc.py"),
            artifacts={"keras_model": str(keras_copy)},
            signature=logged_models.image_signature(),
            pip_requirements=logged_models.pinned_requirements(logged_models.KERAS_REQUIREMENTS),
        ).model_uri
    uris = {}
    for label, uri in (("onnx", onnx_uri), ("tf pyfunc", tf_uri)):
        version = registry.register(uri, REGISTERED, tags={})
        uris[label] = registry.version_uri(REGISTERED, str(version.version))
    return uris


def echo_command(port: int) -> ServerCommand:
    base = url_for("127.0.0.1", port)
    return ServerCommand(
        argv=[
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(BENCHMARKS),
            "echo_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-access-log",
        ],
        env_overrides={"PATH": server_path()},
        url=f"{base}/invocations",
        ready_url=f"{base}/ping",
    )


def ready_after(process, url: str, started: float, timeout_s: float = 300) -> float:
    """Seconds from `started` (just before the process was started) to the first 200."""
    import urllib.error
    import urllib.request

    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve_speed: the server exited ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.02)
    raise SystemExit(f"serve_speed: {url} did not answer within {timeout_s} s")


def line(label: str, result: load.Result, images_per_request: int = 1) -> str:
    per_s = result.per_s()
    return (
        f"    {label:<22} p50 {result.quantile_ms(0.5):8.2f} ms  p99 "
        f"{result.quantile_ms(0.99):8.2f} ms  {per_s:8.1f} req/s  "
        f"{per_s * images_per_request:9.0f} images/s  errors {result.failed}"
        + (f"  {result.errors[0]}" if result.errors else "")
    )


def measure(
    url: str, singles: list[bytes], batches: list[bytes], args, pid: int
) -> dict[str, load.Result | float]:
    load.run_clients(url, singles, 50, 1)  # warm-up
    load.run_clients(url, batches, 2, 1)
    rows = {
        "single": load.run_clients(url, singles, args.single, 1),
        "concurrent": load.run_clients(url, singles, args.concurrent, args.clients),
        "batch": load.run_clients(url, batches, args.batches, 1),
    }
    print(line("1 client, 1 image", rows["single"]), flush=True)
    print(line(f"{args.clients} clients, 1 image", rows["concurrent"]), flush=True)
    print(line(f"1 client, {args.batch} images", rows["batch"], args.batch), flush=True)
    rss = load.tree_rss_bytes(pid) / 2**20
    print(f"    server RSS {rss:.0f} MiB", flush=True)
    batching = version_stats(url)
    if batching:
        print(
            f"    {batching['requests']} requests answered by {batching['model_calls']} model "
            "calls",
            flush=True,
        )
    return {**rows, "rss_mib": rss}


def version_stats(url: str) -> dict:
    """The onnx server's /version counters (other servers have none)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url.replace("/invocations", "/version"), timeout=5) as answer:
            stats = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    return stats if "model_calls" in stats else {}


def ratios(name: str, measured: dict[str, dict], batch: int, label: str = "onnx") -> None:
    echo, tf, onnx = (measured.get(k) for k in ("echo", "tf pyfunc", label))
    if onnx is None:
        return
    print(f"{name}: targets, {label} server against echo (same client, same run):")
    if echo is not None:
        print(
            f"    single-image p50: {onnx['single'].quantile_ms(0.5):.2f} / "
            f"{echo['single'].quantile_ms(0.5):.2f} ms = "
            f"{onnx['single'].quantile_ms(0.5) / echo['single'].quantile_ms(0.5):.2f}x "
            "(target <= 1.5x)"
        )
        print(
            f"    8 clients: {onnx['concurrent'].per_s():.0f} / "
            f"{echo['concurrent'].per_s():.0f} req/s = "
            f"{onnx['concurrent'].per_s() / echo['concurrent'].per_s():.2f}x (target >= 0.7x); "
            f"p99 {onnx['concurrent'].quantile_ms(0.99):.2f} / "
            f"{echo['concurrent'].quantile_ms(0.99):.2f} ms = "
            f"{onnx['concurrent'].quantile_ms(0.99) / echo['concurrent'].quantile_ms(0.99):.2f}x"
            " (target <= 3x)"
        )
    print(
        f"    batches of {batch}: {onnx['batch'].per_s() * batch:.0f} images/s "
        "(target >= 5,000); errors "
        f"{sum(onnx[k].failed for k in ('single', 'concurrent', 'batch'))} (target 0); "
        f"RSS {onnx['rss_mib']:.0f} MiB (target <= 250); ready in {onnx['ready_s']:.2f} s "
        "(target <= 3)"
    )
    if tf is not None:
        print(
            f"    against the tf pyfunc: p50 {tf['single'].quantile_ms(0.5):.2f} -> "
            f"{onnx['single'].quantile_ms(0.5):.2f} ms, 8 clients "
            f"{tf['concurrent'].per_s():.0f} -> {onnx['concurrent'].per_s():.0f} req/s, "
            f"batches {tf['batch'].per_s() * batch:.0f} -> "
            f"{onnx['batch'].per_s() * batch:.0f} images/s, RSS {tf['rss_mib']:.0f} -> "
            f"{onnx['rss_mib']:.0f} MiB, ready {tf['ready_s']:.1f} -> "
            f"{onnx['ready_s']:.2f} s"
        )


def in_turns(
    commands: dict[str, ServerCommand], tmp: Path, singles: list[bytes], rounds: int, n: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict]]:
    """Start every server in `commands`, all running at once, and measure them in turns,
    `rounds` times: `n` single images from one client, then `n` from 8. Per server, per turn:
    the single-image p50 (`p50`), and the 8 clients' req/s (`per_s`) and p99 (`p99`); and
    each server's /version counters at the end. Drift of the machine hits every server
    alike, which one measurement each cannot promise."""
    servers = {}
    try:
        for label, command in commands.items():
            out = open(tmp / f"{label}-turns.log", "wb")
            servers[label] = (command, start(command, log=out), out)
        for command, process, _ in servers.values():
            ready_after(process, command.ready_url, time.perf_counter())
            load.run_clients(command.url, singles, 200, 1)  # warm-up
        figures: dict[str, dict[str, list[float]]] = {
            label: {"p50": [], "per_s": [], "p99": []} for label in servers
        }
        for _ in range(rounds):
            for label, (command, _, _) in servers.items():
                single = load.run_clients(command.url, singles, n, 1)
                crowd = load.run_clients(command.url, singles, n, 8)
                figures[label]["p50"].append(single.quantile_ms(0.5))
                figures[label]["per_s"].append(crowd.per_s())
                figures[label]["p99"].append(crowd.quantile_ms(0.99))
        return figures, {label: version_stats(c.url) for label, (c, _, _) in servers.items()}
    finally:
        for _, process, out in servers.values():
            stop(process)
            out.close()


def targets_in_turns(
    cfg, uri: str, singles: list[bytes], tmp: Path, rounds: int, n: int, int8: bool
) -> None:
    """The two ratio targets again, the echo, the onnx server on the float and on the int8
    graph and the same server without its model call (`no_model_command`) all running and
    measured in turns: the median over turns of each turn's ratio to the echo."""
    served = served_artifacts.locate(cfg, uri, tmp / "cache")
    onnx = model_server_command(cfg, port=load_port(), served=served)
    commands = {"echo": echo_command(load_port()), "onnx": onnx}
    if int8 and (served.folder / INT8_FILE).is_file():
        commands["onnx int8"] = model_server_command(
            cfg, port=load_port(), served=served, int8=True
        )
    commands["no model"] = no_model_command(onnx, load_port())
    figures, _ = in_turns(commands, tmp, singles, rounds, n)
    for label, what in (
        ("onnx", "onnx"),
        ("onnx int8", "onnx on the int8 graph"),
        ("no model", "the onnx server whose model call costs nothing (the floor)"),
    ):
        if label not in figures:
            continue
        p50, per_s, p99 = (
            [o / e for o, e in zip(figures[label][k], figures["echo"][k], strict=True)]
            for k in ("p50", "per_s", "p99")
        )
        print(
            f"    in turns, {', '.join(commands)} all running, {rounds} turns of {n} single "
            f"images each (1 client, then 8), median of the turns' ratios, {what}: "
            f"single-image p50 {statistics.median(p50):.2f}x (target <= 1.5x); 8 clients "
            f"{statistics.median(per_s):.2f}x (target >= 0.7x), p99 "
            f"{statistics.median(p99):.2f}x (target <= 3x)",
            flush=True,
        )
        print(
            f"      per turn: p50 {', '.join(f'{v:.2f}' for v in p50)}; 8 clients "
            f"{', '.join(f'{v:.2f}' for v in per_s)}",
            flush=True,
        )


def no_model_command(onnx: ServerCommand, port: int) -> ServerCommand:
    """`onnx`'s server on `port`, its model call answered at no cost (`no_model_app.py`)."""
    argv = list(onnx.argv)
    argv[argv.index(f"{app.__name__}:create")] = "no_model_app:create"
    argv[argv.index("--port") + 1] = str(port)
    base = url_for("127.0.0.1", port)
    return dataclasses.replace(
        onnx,
        argv=[*argv, "--app-dir", str(BENCHMARKS)],
        url=f"{base}/invocations",
        ready_url=f"{base}/ping",
    )


def log_cost(cfg, uri: str, singles: list[bytes], tmp: Path, rounds: int, n: int) -> None:
    """What the request log costs a single image: the ONNX server without it and with it
    (SQLite in `tmp`), both running, measured in turns, `rounds` times each."""
    from mnist_pipeline.config.loading import checkout_section

    monitoring = checkout_section("monitoring", ROOT).model_copy(
        update={"log": f"sqlite:///{tmp / 'requests.db'}", "log_requests": True}
    )
    commands = {
        label: model_server_command(
            cfg, model_uri=uri, port=load_port(), cache=str(tmp / "cache"), monitoring=with_log
        )
        for label, with_log in (("onnx", None), ("onnx+log", monitoring))
    }
    figures, stats = in_turns(commands, tmp, singles, rounds, n)
    logged = stats["onnx+log"].get("log", {})
    plain, logging = (statistics.median(figures[k]["p50"]) for k in ("onnx", "onnx+log"))
    crowd_plain, crowd_log = (statistics.median(figures[k]["per_s"]) for k in ("onnx", "onnx+log"))
    print(
        f"    request log, {rounds} turns of {n} single images each (1 client, then 8): "
        f"p50 {plain:.3f} -> {logging:.3f} ms = {logging / plain:.3f}x (target <= 1.10x); "
        f"8 clients {crowd_plain:.0f} -> {crowd_log:.0f} req/s = {crowd_log / crowd_plain:.3f}x;"
        f" rows written {logged.get('rows_written')}, dropped {logged.get('rows_dropped')}",
        flush=True,
    )
    print(
        f"      p50 per turn: without {', '.join(f'{v:.3f}' for v in figures['onnx']['p50'])}; "
        f"with {', '.join(f'{v:.3f}' for v in figures['onnx+log']['p50'])} ms",
        flush=True,
    )


def one_picture(store_uri: str, uris: dict[str, str]) -> None:
    """`mnist-predict` on one picture (the ONNX version), against loading the TensorFlow
    pyfunc and predicting one picture, each a fresh process, three times."""
    picture = ROOT / "examples" / "three.png"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = Path(sys.executable).parent / "mnist-predict"
    tf_code = (
        "import mlflow, numpy as np\n"
        "from mnist_pipeline.serve import imaging\n"
        f"model = mlflow.pyfunc.load_model({uris['tf pyfunc']!r})\n"
        f"print(model.predict(imaging.convert({str(picture)!r})[None]).argmax())\n"
    )
    for label, argv in (
        ("mnist-predict (onnx)", [str(script), str(picture), "--model-uri", uris["onnx"]]),
        ("tf pyfunc, one picture", [sys.executable, "-c", tf_code]),
    ):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300
            )
            times.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(f"serve_speed: {label} failed:\n{done.stderr[-2000:]}")
        print(
            f"    {label:<24} {statistics.median(times):.2f} s median of 3 "
            f"({', '.join(f'{t:.2f}' for t in times)}); said: {done.stdout.strip()}",
            flush=True,
        )


def soak(url: str, singles: list[bytes], n: int, pid: int) -> None:
    rss: list[int] = []
    marks: list[float] = [time.perf_counter()]

    def sample(done: int) -> None:
        rss.append(load.tree_rss_bytes(pid))
        marks.append(time.perf_counter())
        print(
            f"      {done:6d} requests: RSS {rss[-1] / 2**20:.1f} MiB, last thousand at "
            f"{1000 / (marks[-1] - marks[-2]):.0f} req/s",
            flush=True,
        )

    result = load.run_clients(url, singles, n, 16, every=1000, on_every=sample)
    print(line("soak, 16 clients", result), flush=True)
    if len(rss) >= 2:
        print(
            f"    RSS first -> last thousand: {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB "
            f"({100 * (rss[-1] / rss[0] - 1):+.1f}%)",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FILE.keras")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--single", type=int, default=2000, help="requests, one client")
    parser.add_argument("--concurrent", type=int, default=4000, help="requests, all clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="batch requests")
    parser.add_argument("--soak", type=int, default=0, help="requests, 16 clients")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="turns of the echo-against-onnx measurement of the targets (0: skip it)",
    )
    parser.add_argument(
        "--log-rounds",
        type=int,
        default=5,
        help="turns of the request log's cost measurement (0: skip it)",
    )
    args = parser.parse_args()
    wanted = args.servers.split(",")
    images = test_images(args.data, 4 * args.batch)
    singles, batches = bodies(images, args.batch)
    from harness import cpu_model

    print(
        f"{cpu_model()}; load average {os.getloadavg()}, {os.cpu_count()} CPUs; "
        f"{len(images)} test images",
        flush=True,
    )
    for spec in args.model:
        name, _, path = spec.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            uris = log_both(Path(path), Path(tmp), load_split(args.data, "val").images)
            cfg = tracking_config(ROOT)
            measured: dict[str, dict] = {}
            for label in SERVERS:
                if label not in wanted:
                    continue
                port = load_port()
                if label == "echo":
                    command = echo_command(port)
                elif label == "onnx int8":  # no gate ran in this store: its folder, as is
                    served = served_artifacts.locate(cfg, uris["onnx"], Path(tmp) / "cache")
                    if not (served.folder / INT8_FILE).is_file():
                        print(f"{name}: onnx int8: no int8 graph (see the warning above)")
                        continue
                    command = model_server_command(cfg, port=port, served=served, int8=True)
                else:
                    command = model_server_command(
                        cfg,
                        model_uri=uris[label],
                        port=port,
                        mlflow=label == "tf pyfunc",
                        cache=str(Path(tmp) / "cache"),
                    )
                with open(Path(tmp) / f"{label}.log", "wb") as log:
                    started = time.perf_counter()
                    process = start(command, log=log)
                    try:
                        ready_s = ready_after(process, command.ready_url, started)
                        print(f"{name}: {label}, ready in {ready_s:.2f} s", flush=True)
                        measured[label] = {
                            **measure(command.url, singles, batches, args, process.pid),
                            "ready_s": ready_s,
                        }
                        if args.soak and label == "onnx":
                            soak(command.url, singles, args.soak, process.pid)
                    finally:
                        stop(process)
            ratios(name, measured, args.batch)
            ratios(name, measured, args.batch, "onnx int8")
            if args.rounds and {"echo", "onnx"} <= set(wanted):
                targets_in_turns(
                    cfg,
                    uris["onnx"],
                    singles,
                    Path(tmp),
                    args.rounds,
                    args.single,
                    int8="onnx int8" in wanted,
                )
            if args.log_rounds:
                log_cost(cfg, uris["onnx"], singles, Path(tmp), args.log_rounds, args.single)
            one_picture(os.environ["MLFLOW_TRACKING_URI"], uris)
    print(f"load average {os.getloadavg()}")
    return 0


def load_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
