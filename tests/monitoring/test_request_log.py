"""The request log and /metrics of `make serve`'s app, on a real uvicorn server on loopback:
every answer recorded, the log bounded, a SIGKILL losing at most the last flush and never
tearing a row, a full disk or an unwritable place never failing a request."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_store
from helpers.digits import synthetic_digits
from helpers.serving import post
from prometheus_client.parser import text_string_to_metric_families

from mnist_pipeline.monitoring import features
from mnist_pipeline.monitoring.requestlog import RequestLog, Rows
from mnist_pipeline.serve import app
from mnist_pipeline.serve.process import ServerCommand, start, stop, wait_until_ready

pytestmark = pytest.mark.slow

THRESHOLD = 0.5  # the abstention threshold the tiny model's calibration.json carries


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """A small softmax model's ONNX export with a calibration, as a version's served folder."""
    import keras

    from mnist_pipeline.training import models

    keras.utils.set_random_seed(2)
    images, labels = synthetic_digits(600, seed=5)
    model = keras.Sequential(
        [
            keras.Input((28, 28), dtype="uint8"),
            keras.layers.Rescaling(1 / 255, dtype="float32"),
            keras.layers.Flatten(dtype="float32"),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=2, verbose=0)
    folder = tmp_path_factory.mktemp("served")
    models.export_onnx(model, folder / "model.onnx")
    (folder / "calibration.json").write_text(
        json.dumps({"temperature": 1.3, "threshold": THRESHOLD})
    )
    return folder


@contextlib.contextmanager
def serving(
    folder: Path,
    tmp_path: Path,
    log_url: str | None,
    *,
    flush_s: float = 0.2,
    max_rows: int = 1_000_000,
    sample: float = 0.0,
    file_limit: int | None = None,
):
    """`make serve`'s app (uvicorn, app.create) on a free port; yields (port, process, log)."""
    port = tiny_store.free_port()
    env = {
        app.MODEL_DIR_ENV: str(folder),
        app.MODEL_NAME_ENV: "digits",
        app.MODEL_VERSION_ENV: "7",
        app.LOG_FLUSH_ENV: str(flush_s),
        app.LOG_MAX_ROWS_ENV: str(max_rows),
        app.LOG_IMAGES_ENV: str(sample),
    }
    if log_url:
        env[app.LOG_ENV] = log_url
    command = ServerCommand(
        argv=[
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"{app.__name__}:create",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        env_overrides={**env, "PATH": os.environ["PATH"]},
        url="",
        ready_url=f"http://127.0.0.1:{port}/ping",
    )
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "wb") as out:
        if file_limit is None:
            process = start(command, log=out)
        else:  # a disk that fills up: writes past `file_limit` bytes fail with EFBIG

            def limit() -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

            process = subprocess.Popen(
                command.argv,
                env=command.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=limit,
            )
        try:
            wait_until_ready(process, command.ready_url, 120)
            yield port, process, log_path
        finally:
            stop(process)


def ask(port: int, images: np.ndarray) -> dict:
    status, body = post(port, {"inputs": images.tolist()})
    assert status == 200, body
    return json.loads(body)


def get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.read().decode()


def until(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def log_rows(path: Path) -> list[sqlite3.Row]:
    """The log's rows; none while the server is still creating the file and its table."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        try:
            return db.execute("SELECT * FROM requests ORDER BY id").fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return []
            raise


IMAGES = synthetic_digits(300, seed=9)[0]


def test_monitor_log_records_every_answer_off_the_request_path(onnx_folder, tmp_path):
    db = tmp_path / "log" / "requests.db"
    with serving(onnx_folder, tmp_path, f"sqlite:///{db}") as (port, _, _):
        answers = [ask(port, IMAGES[i : i + n]) for i, n in ((0, 1), (1, 5), (6, 40), (46, 1))]
        until(lambda: db.exists() and len(log_rows(db)) == 47)
        version = json.loads(get(port, "/version"))
    rows = log_rows(db)
    assert len(rows) == 47 and version["log"] == {"rows_written": 47, "rows_dropped": 0}
    probabilities = np.concatenate([np.asarray(a["predictions"]) for a in answers])
    unsure = np.concatenate([a["unsure"] for a in answers])
    predicted, confidence, entropy = features.output_statistics(probabilities)
    stats = features.input_statistics(IMAGES[:47])
    assert [r["predicted"] for r in rows] == predicted.tolist()
    np.testing.assert_allclose([r["confidence"] for r in rows], confidence, rtol=1e-6)
    np.testing.assert_allclose([r["entropy"] for r in rows], entropy, rtol=1e-5, atol=1e-7)
    assert [bool(r["unsure"]) for r in rows] == unsure.tolist()
    for i, name in enumerate(features.INPUT_STATISTICS):
        np.testing.assert_allclose([r[name] for r in rows], stats[:, i], rtol=1e-6)
    assert {(r["model"], r["version"]) for r in rows} == {("digits", "7")}
    assert [r["request"] for r in rows] == [1] + [2] * 5 + [3] * 40 + [4]
    assert all(r["image"] is None for r in rows)  # no pixels unless sampling is on
    with contextlib.closing(sqlite3.connect(db)) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_monitor_log_gets_every_waiting_answer_on_a_clean_stop(onnx_folder, tmp_path):
    """SIGTERM (Ctrl-C, `make serve` stopped): what waits for the next flush is written."""
    db = tmp_path / "requests.db"
    with serving(onnx_folder, tmp_path, f"sqlite:///{db}", flush_s=60) as (port, _, _):
        for i in range(12):
            ask(port, IMAGES[i : i + 2])
        assert json.loads(get(port, "/version"))["log"]["rows_written"] == 0  # still waiting
    assert len(log_rows(db)) == 24


def test_monitor_log_keeps_sampled_pixels_only_when_asked(onnx_folder, tmp_path):
    db = tmp_path / "requests.db"
    with serving(onnx_folder, tmp_path, f"sqlite:///{db}", sample=1.0) as (port, _, _):
        ask(port, IMAGES[:3])
        until(lambda: db.exists() and len(log_rows(db)) == 3)
    kept = [np.frombuffer(r["image"], np.uint8).reshape(28, 28) for r in log_rows(db)]
    np.testing.assert_array_equal(np.stack(kept), IMAGES[:3])


def test_monitor_log_rotation_keeps_the_newest_rows(tmp_path):
    log = RequestLog(f"sqlite:///{tmp_path / 'r.db'}", create=True)
    for first in range(0, 2500, 500):
        n = 500
        images = IMAGES[np.arange(first, first + n) % len(IMAGES)]
        predicted, confidence, entropy = features.output_statistics(
            np.full((n, 10), 0.1, np.float32)
        )
        log.append(
            "m",
            "1",
            Rows(
                time=np.full(n, 1.0),
                request=np.arange(first, first + n),
                predicted=predicted,
                confidence=confidence,
                entropy=entropy,
                unsure=np.zeros(n, bool),
                inputs=features.input_statistics(images),
            ),
            max_rows=1200,
        )
    window = log.rows("m", "1")
    assert log.count() == 1200 == len(window)
    assert window.first_id == 1301 and window.last_id == 2500
    assert (tmp_path / "r.db").stat().st_size < 2_000_000


def test_monitor_log_survives_sigkill_without_torn_rows(onnx_folder, tmp_path):
    """A client keeps asking; the server is SIGKILLed mid-stream. Every row in the log is whole,
    and the answers missing from it are at most those of the last flush interval."""
    db = tmp_path / "requests.db"
    flush_s = 0.2
    answered: list[float] = []  # when each answer came back
    with serving(onnx_folder, tmp_path, f"sqlite:///{db}", flush_s=flush_s) as (port, proc, _):
        stop_at = time.monotonic() + 3.0

        def client() -> None:
            i = 0
            # The kill ends the stream: a refused connection, or an answer cut short.
            with contextlib.suppress(OSError, http.client.HTTPException):
                while time.monotonic() < stop_at:
                    ask(port, IMAGES[i % 300 : i % 300 + 1])
                    answered.append(time.monotonic())
                    i += 1

        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        thread.join(30)
    answered_before_kill = sum(t <= killed_at for t in answered)
    with contextlib.closing(sqlite3.connect(db)) as check:  # opening recovers the WAL
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = log_rows(db)
    lost = answered_before_kill - len(rows)
    rate = answered_before_kill / 2.0
    print(
        f"\nSIGKILL after {answered_before_kill} answers ({rate:.0f}/s): {len(rows)} rows "
        f"logged, {lost} lost (flush interval {flush_s} s = ~{rate * flush_s:.0f} answers)"
    )
    assert len(rows) > 0
    assert 0 <= lost <= rate * (2 * flush_s) + 50
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["confidence"] is not None and 0 <= r["predicted"] <= 9 for r in rows)


def test_monitor_log_on_a_full_disk_never_fails_a_request(onnx_folder, tmp_path):
    db = tmp_path / "requests.db"
    with serving(onnx_folder, tmp_path, f"sqlite:///{db}", flush_s=0.05, file_limit=96 * 1024) as (
        port,
        _,
        log_path,
    ):
        statuses = []
        for i in range(0, 3000, 50):  # ~3,000 rows: far more than 96 KiB holds
            statuses.append(post(port, {"inputs": IMAGES[i % 250 : i % 250 + 50].tolist()})[0])
            time.sleep(0.01)
        dropped = until(lambda: json.loads(get(port, "/version"))["log"]["rows_dropped"])
        version = json.loads(get(port, "/version"))
        metrics = get(port, "/metrics")
        assert ask(port, IMAGES[:1])["predictions"]  # still answering
    assert statuses == [200] * len(statuses)
    assert dropped > 0 and version["log"]["rows_written"] > 0
    rows_metric = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "mnist_request_log_rows"
        for sample in family.samples
        if sample.name == "mnist_request_log_rows_total"
    }
    assert rows_metric["dropped"] >= dropped and rows_metric["written"] > 0
    output = log_path.read_text()
    # One warning when writes start failing, not one per flush (~60 flushes failed here).
    # SQLite may find room again once it reopens the file (its write-ahead log restarts):
    # then one saying so, with the count, and one more if it fills up again.
    failed, recovered = output.count("failed ("), output.count("works again (")
    assert failed >= 1 and failed - recovered in (0, 1) and str(db) in output, output
    assert failed + recovered <= 6, output


def test_monitor_log_in_an_unwritable_place_never_fails_a_request(onnx_folder, tmp_path):
    """/proc is a read-only filesystem for everyone, root included."""
    url = "sqlite:////proc/mnist-monitoring/requests.db"
    with serving(onnx_folder, tmp_path, url, flush_s=0.05) as (port, _, log_path):
        answers = [ask(port, IMAGES[i : i + 1]) for i in range(20)]
        until(lambda: json.loads(get(port, "/version"))["log"]["rows_dropped"] >= 20)
        version = json.loads(get(port, "/version"))
    assert len(answers) == 20 and version["log"]["rows_written"] == 0
    output = log_path.read_text()
    assert output.count("WARNING: the request log") == 1, output
    assert "/proc/mnist-monitoring" in output


def scrape(port: int) -> dict[str, list]:
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(get(port, "/metrics"))
    }


def test_metrics_scrape_counts_answers_classes_abstentions_and_latency(onnx_folder, tmp_path):
    with serving(onnx_folder, tmp_path, None) as (port, _, _):
        answers = [ask(port, IMAGES[i : i + n]) for i, n in ((0, 1), (1, 30), (31, 1), (32, 8))]
        assert post(port, {"inputs": [[1, 2]]})[0] == 400
        assert post(port, b"{}", content_type="text/plain")[0] == 415
        metrics = until(
            lambda: (m := scrape(port))["mnist_predictions"]
            and sum(s.value for s in m["mnist_predictions"]) == 40
            and m
        )
    probabilities = np.concatenate([np.asarray(a["predictions"]) for a in answers])
    unsure = np.concatenate([a["unsure"] for a in answers])
    predicted = probabilities.argmax(axis=1)
    by_status = {
        s.labels["status"]: s.value
        for s in metrics["mnist_requests"]
        if s.name == "mnist_requests_total"
    }
    assert by_status == {"200": 4.0, "400": 1.0, "415": 1.0}
    by_digit = {
        int(s.labels["digit"]): s.value
        for s in metrics["mnist_predictions"]
        if s.name == "mnist_predictions_total"
    }
    assert by_digit == {
        d: float(c) for d, c in enumerate(np.bincount(predicted, minlength=10)) if c
    }
    abstained = [
        s.value for s in metrics["mnist_abstentions"] if s.name == "mnist_abstentions_total"
    ]
    assert abstained == [float(unsure.sum())]
    confidence = {
        s.labels.get("le"): s.value
        for s in metrics["mnist_prediction_confidence"]
        if s.name == "mnist_prediction_confidence_bucket"
    }
    top = probabilities.max(axis=1)
    assert confidence["+Inf"] == 40
    assert confidence["0.5"] == float((top <= 0.5).sum())
    assert confidence["0.9"] == float((top <= 0.9).sum())
    latency = {s.name: s.value for s in metrics["mnist_request_duration_seconds"]}
    assert latency["mnist_request_duration_seconds_count"] == 6  # refusals too
    assert 0 < latency["mnist_request_duration_seconds_sum"] < 30
    info = metrics["mnist_served_model_info"][0]
    assert info.labels == {
        "model": "digits",
        "version": "7",
        "runtime": "onnxruntime",
        "precision": "float32",
    }
    calls = metrics["mnist_model_calls"][0].value
    assert 1 <= calls <= 4


def test_metrics_content_type_is_prometheus_text(onnx_folder, tmp_path):
    import urllib.request

    with serving(onnx_folder, tmp_path, None) as (port, _, _):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert b"# TYPE mnist_request_duration_seconds histogram" in answer.read()
