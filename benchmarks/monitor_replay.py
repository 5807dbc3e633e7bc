"""Proof by replay: real traffic through `make serve`'s server, then the monitor on its log.

    python benchmarks/monitor_replay.py --model best=best.keras
    python benchmarks/monitor_replay.py --model mlp=models/model.keras --window 500

The `.keras` model is logged as the train stage logs it (the ONNX export with the calibration
fitted on the validation split) into a throwaway SQLite store, registered, and given its
reference as the evaluate stage gives it (`promotion.log_reference`: calibrated outputs on
the clean test set). `make serve`'s server then answers, one client, batches of 10 images:

1. the 10,000 clean official test digits in a random order: 20 windows of 500;
2. for each of the 15 corruptions of the suite (data/corrupted, `dvc repro corrupt`), 2
   windows of 500 images drawn at random from its 10,000.

Each phase's windows are read back from the server's request log and checked with the
monitor's own functions (`monitor.check_window`: the drift tests, the estimated accuracy),
and their true accuracy is computed from the labels the benchmark knows. It prints, per
phase: alarms, windows to the first alarm, true accuracy, the configured estimate (ATC by
default) and CBPE for each window, and the tests that fired. Then the false-alarm rate on
many more clean windows, resampled from the model's own test-set outputs (no server: the
same functions on the same numbers), and, as a harder case, on the validation digits (other
writers' digits from MNIST's training half). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mnist_pipeline.config.loading import checkout_section, tracking_config  # noqa: E402
from mnist_pipeline.data import suite  # noqa: E402
from mnist_pipeline.data.splits import load_split  # noqa: E402
from mnist_pipeline.monitoring import drift, monitor, requestlog  # noqa: E402
from mnist_pipeline.serve.model_server import model_server_command  # noqa: E402
from mnist_pipeline.serve.process import start, stop, wait_until_ready  # noqa: E402

REGISTERED = "monitor-replay"


def log_model(keras_file: Path, store_dir: Path, data: Path):
    """The model logged and registered as the train and evaluate stages would; returns
    (version URI, the Reference, the calibration)."""
    import mlflow

    from mnist_pipeline.evaluation import promotion
    from mnist_pipeline.tracking import registry
    from mnist_pipeline.training import calibration, job, models
    from mnist_pipeline.training.fit import predict

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store_dir / 'mlflow.db'}"
    mlflow.set_experiment(
        experiment_id=mlflow.create_experiment(
            "monitor-replay", artifact_location=(store_dir / "artifacts").as_uri()
        )
    )
    model = models.load(keras_file)
    val, test = load_split(data, "val"), load_split(data, "test")
    fitted = calibration.fit(
        predict(model, val.images, 1000),
        val.labels,
        target=checkout_section("train", ROOT).calibration.selective_accuracy,
        scale_temperature=True,
        val_sha256=val.sha256(),
    )
    calibrated = calibration.scale(predict(model, test.images, 1000), fitted.temperature)
    with mlflow.start_run() as run:
        uri = job.log_served(model, fitted)
        promotion.log_reference(run.info.run_id, test, calibrated)
    version = registry.register(uri, REGISTERED, tags={})
    reference = drift.Reference.labelled(test.images, calibrated, test.labels)
    return registry.version_uri(REGISTERED, str(version.version)), reference, fitted


def send(port: int, images: np.ndarray) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for start_ in range(0, len(images), 10):
            body = json.dumps({"inputs": images[start_ : start_ + 10].tolist()})
            connection.request(
                "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
            )
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                raise SystemExit(f"monitor_replay: the server answered {answer.status}")
    finally:
        connection.close()


def logged(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=10) as answer:
        return json.loads(answer.read())["log"]["rows_written"]


def replay(port: int, images: np.ndarray, expected_rows: int) -> None:
    send(port, images)
    deadline = time.monotonic() + 60
    while logged(port) < expected_rows:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"monitor_replay: {logged(port)} rows logged, expected {expected_rows}"
            )
        time.sleep(0.05)


def report(name: str, checked: list[monitor.Checked], truth: list[float]) -> dict:
    alarms = [c.drift.alarm for c in checked]
    first = next((i + 1 for i, a in enumerate(alarms) if a), None)
    errors = [abs(c.estimate.accuracy - t) for c, t in zip(checked, truth, strict=True)]
    fired = sorted({name_ for c in checked for name_ in c.drift.fired})
    cells = "  ".join(
        f"{t:.3f}/{c.estimate.accuracy:.3f}/{c.cbpe.accuracy:.3f}"
        for c, t in zip(checked, truth, strict=True)
    )
    print(
        f"{name:<15} {sum(alarms):>2}/{len(alarms):<2} {first or '-':>5}  "
        f"{max(errors) * 100:5.1f}  {cells}  "
        f"{','.join(f.replace('input:', '') for f in fired) or '-'}",
        flush=True,
    )
    unexplained = sum(err > 0.03 and not c.caveat for c, err in zip(checked, errors, strict=True))
    return {
        "name": name,
        "alarms": sum(alarms),
        "windows": len(alarms),
        "first": first,
        "max_error": max(errors),
        "fired": fired,
        "unexplained": unexplained,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, metavar="NAME=FILE.keras")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--corrupted", type=Path, default=ROOT / "data" / "corrupted")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--clean-windows", type=int, default=20)
    parser.add_argument("--corrupted-windows", type=int, default=2)
    parser.add_argument(
        "--resample",
        type=int,
        default=1000,
        help="clean windows resampled for the false-alarm rate",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-distance", type=float, help="KS distance floor (default: monitoring.min_distance)"
    )
    parser.add_argument(
        "--in-order",
        action="store_true",
        help="replay the clean test digits in the test set's own order "
        "(writers in runs) instead of shuffled",
    )
    args = parser.parse_args()
    label, _, keras_file = args.model.partition("=")
    cfg = checkout_section("monitoring", ROOT)
    alpha, method, size = cfg.alpha, cfg.estimator, args.window
    floor = cfg.min_distance if args.min_distance is None else args.min_distance
    rng = np.random.default_rng(args.seed)
    test = load_split(args.data, "test")
    corrupted = suite.load(args.corrupted, test)
    print(
        f"{label}: windows of {size}, alpha {alpha:g}, KS floor {floor:g}, estimator "
        f"{method}, clean digits {'in the test set order' if args.in_order else 'shuffled'}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()}",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp)
        uri, reference, fitted = log_model(Path(keras_file), store_dir, args.data)
        print(
            f"{label}: temperature {fitted.temperature:.4f}, reference accuracy "
            f"{reference.accuracy:.4f} on {len(reference)} clean test images",
            flush=True,
        )
        log_file = store_dir / "requests.db"
        monitoring = cfg.model_copy(
            update={"log": f"sqlite:///{log_file}", "flush_interval_s": 0.2, "log_requests": True}
        )
        port = 5990
        command = model_server_command(
            tracking_config(ROOT), model_uri=uri, port=port, monitoring=monitoring
        )
        os.environ.pop(requestlog.LOG_ENV, None)
        phases: list[tuple[str, np.ndarray, np.ndarray]] = []
        order = (np.arange(len(test)) if args.in_order else rng.permutation(len(test)))[
            : args.clean_windows * size
        ]
        phases.append(("clean", test.images[order], test.labels[order]))
        for name, images in corrupted.images.items():
            pick = rng.choice(len(images), args.corrupted_windows * size, replace=False)
            phases.append((name, images[pick], test.labels[pick]))
        with open(store_dir / "server.log", "wb") as out:
            process = start(command, log=out)
            try:
                wait_until_ready(process, command.ready_url, 120)
                started, rows = time.perf_counter(), 0
                for _, images, _ in phases:
                    rows += len(images)
                    replay(port, images, rows)
                print(
                    f"{label}: replayed {rows} images in {time.perf_counter() - started:.1f} s "
                    "through make serve's server",
                    flush=True,
                )
            finally:
                stop(process)
        log = requestlog.RequestLog(f"sqlite:///{log_file}")
        everything = log.rows(REGISTERED, "1")
        log.close()

    print(
        f"\n{'phase':<15} alarms first  max|err|pt  per window: true/{method}/cbpe  tests fired",
        flush=True,
    )
    results, at = [], 0
    for name, images, labels in phases:
        n = len(images)
        part = requestlog.split(everything.take(slice(at, at + n)), size)
        truth = [
            float((w.outputs.predicted == labels[i * size : (i + 1) * size]).mean())
            for i, w in enumerate(part)
        ]
        checked = [
            monitor.check_window(w, reference, alpha=alpha, method=method, min_distance=floor)
            for w in part
        ]
        results.append(report(name, checked, truth))
        at += n
    corruption_results = results[1:]
    caught = [r for r in corruption_results if r["alarms"] and r["first"] <= args.corrupted_windows]
    off = [r["name"] for r in results if r["max_error"] > 0.03]
    print(
        f"\nclean: {results[0]['alarms']} alarms in {results[0]['windows']} windows; "
        f"corruptions caught within {args.corrupted_windows} windows: {len(caught)} of "
        f"{len(corruption_results)} (missed: "
        f"{', '.join(r['name'] for r in corruption_results if r not in caught) or 'none'}); "
        f"estimate off by more than 3 points in: {', '.join(off) or 'none'}; such windows "
        f"without a note saying why: {sum(r['unexplained'] for r in results)}",
        flush=True,
    )

    alarms = 0
    for _ in range(args.resample):
        pick = rng.choice(len(reference), size, replace=False)
        alarms += monitor.check_window(
            _window(reference.take(pick)), reference, alpha=alpha, method=method, min_distance=floor
        ).drift.alarm
    print(
        f"false alarms on {args.resample} clean test windows resampled from the reference: "
        f"{alarms} ({alarms / max(args.resample, 1):.2%}; alpha {alpha:g})",
        flush=True,
    )
    val = load_split(args.data, "val")
    from mnist_pipeline.training import models
    from mnist_pipeline.training.calibration import scale
    from mnist_pipeline.training.fit import predict

    model = models.load(Path(keras_file))
    val_out = drift.Outputs.of(
        val.images, scale(predict(model, val.images, 1000), fitted.temperature)
    )
    val_alarms = []
    for start_ in range(0, len(val) - size + 1, size):
        result = monitor.check_window(
            _window(val_out.take(slice(start_, start_ + size))),
            reference,
            alpha=alpha,
            method=method,
            min_distance=floor,
        )
        val_alarms.append(",".join(result.drift.fired) or "-")
    print(
        f"validation digits (MNIST's training half, other writers): "
        f"{sum(a != '-' for a in val_alarms)} alarms in {len(val_alarms)} windows "
        f"({'; '.join(val_alarms)})",
        flush=True,
    )
    return 0


def _window(outputs: drift.Outputs) -> requestlog.Window:
    """Outputs computed here (not logged by a server) as a window of the monitor's."""
    n = len(outputs)
    return requestlog.Window(
        model="",
        version="",
        ids=np.arange(1, n + 1),
        times=np.zeros(n),
        unsure=np.zeros(n, bool),
        outputs=outputs,
    )


if __name__ == "__main__":
    sys.exit(main())
