"""`mnist-pipeline monitor` end to end on the embedded default: a champion evaluated by the
pipeline's own code (its reference logged on its run), `make serve`'s server logging real
answers to SQLite, then the monitor on clean and on shifted traffic: exit codes, one MLflow
run per window, the HTML report."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
from helpers import tiny_store
from helpers.digits import synthetic_digits
from helpers.serving import post

from mnist_pipeline import cli
from mnist_pipeline.config.loading import checkout_section, tracking_config
from mnist_pipeline.data import corruptions
from mnist_pipeline.data.splits import Split
from mnist_pipeline.monitoring.monitor import ALARM_EXIT
from mnist_pipeline.serve.model_server import model_server_command

pytestmark = pytest.mark.slow

WINDOW = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    splits = {
        name: Split(*synthetic_digits(n, seed))
        for name, n, seed in (("train", 600, 1), ("val", 200, 2), ("test", 1000, 3))
    }
    return tiny_store.build(tmp_path_factory.mktemp("monitor-repo"), splits, epochs=4)


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    """`make serve`'s server for the champion, logging to the repository's request log."""
    port = tiny_store.free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_ROOT", str(store.root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MNIST_MONITORING_LOG", raising=False)
        monitoring = checkout_section("monitoring", store.root).model_copy(
            update={"flush_interval_s": 0.1}
        )
        command = model_server_command(
            tracking_config(store.root), port=port, monitoring=monitoring
        )
        with tiny_store.running(command, tmp_path_factory.mktemp("monitor-log") / "s.log"):
            yield port


def send(port: int, images: np.ndarray) -> None:
    for start in range(0, len(images), 10):
        status, body = post(port, {"inputs": images[start : start + 10].tolist()})
        assert status == 200, body


def counts(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=30) as answer:
        return json.loads(answer.read())


def wait_for_rows(port: int, count: int) -> None:
    deadline = time.monotonic() + 30
    while counts(port)["log"]["rows_written"] < count:
        assert time.monotonic() < deadline, f"expected {count} rows logged: {counts(port)}"
        time.sleep(0.05)


def monitor(store, monkeypatch, *args: str) -> int:
    monkeypatch.setenv("DVC_ROOT", str(store.root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MNIST_MONITORING_LOG", raising=False)
    monkeypatch.chdir(store.root)
    try:
        return cli.main(["monitor", "--window", str(WINDOW), *args])
    except SystemExit as exit_:
        return int(exit_.code)


def window_runs(store):
    import mlflow
    from mnist_pipeline.tracking import store as tracking_store

    tracking_store.use_store(store.tracking)
    experiment = mlflow.get_experiment_by_name("monitoring")
    if experiment is None:
        return []
    return mlflow.search_runs([experiment.experiment_id], output_format="list")


def test_monitor_with_too_few_answers_checks_nothing_and_exits_0(
    store, served, monkeypatch, capsys
):
    before = counts(served)["log"]["rows_written"]
    send(served, store.test.images[:20])
    wait_for_rows(served, before + 20)
    assert monitor(store, monkeypatch, "--window", "5000") == 0
    assert "nothing to check yet" in capsys.readouterr().out


def test_monitor_on_clean_traffic_exits_0_and_logs_one_run_per_window(
    store, served, monkeypatch, capsys
):
    before, runs_before = counts(served)["log"]["rows_written"], len(window_runs(store))
    send(served, store.test.images[20:620])
    wait_for_rows(served, before + 600)
    report = store.root / "clean.html"
    assert monitor(store, monkeypatch, "--windows", "3", "--report", str(report)) == 0
    out = capsys.readouterr().out
    assert out.count("estimated accuracy") == 3 and "ALARM" not in out
    runs = window_runs(store)[: len(window_runs(store)) - runs_before]  # newest first
    assert len(runs) == 3
    first = min(
        runs, key=lambda r: int(r.data.tags["monitor.window"].rsplit("/", 1)[1].split("-")[0])
    )
    assert first.data.tags["version"] == store.version and first.data.tags["alarm"] == "false"
    assert first.data.metrics["requests"] == WINDOW
    assert 0 <= first.data.metrics["estimated_accuracy"] <= 1
    assert "p_class_mix" in first.data.metrics and "p_input_mean" in first.data.metrics
    text = report.read_text()
    assert "no alarm in 3 windows" in text and "data:image/png;base64," in text
    # Checked again with no new traffic: the same windows, no new runs.
    assert monitor(store, monkeypatch, "--windows", "3", "--report", str(report)) == 0
    assert len(window_runs(store)) == runs_before + 3


def test_monitor_on_shifted_traffic_raises_the_alarm_and_exits_3(
    store, served, monkeypatch, capsys
):
    before = counts(served)["log"]["rows_written"]
    brighter = corruptions.corrupt(store.test.images[620:1000], "brightness", seed=0)
    send(served, brighter[: 2 * WINDOW - 20])
    send(served, corruptions.corrupt(store.test.images[:20], "brightness", seed=1))
    wait_for_rows(served, before + 2 * WINDOW)
    report = store.root / "shifted.html"
    assert monitor(store, monkeypatch, "--windows", "2", "--report", str(report)) == ALARM_EXIT
    captured = capsys.readouterr()
    assert captured.out.count("ALARM") == 2 and "input:mean" in captured.out
    assert "ALARM in 2 of 2 window(s)" in captured.err
    assert "ALARM in 2 of 2 windows" in report.read_text()
    alarmed = [r for r in window_runs(store)[:2] if r.data.tags["alarm"] == "true"]
    assert len(alarmed) == 2 and all("input:mean" in r.data.tags["fired"] for r in alarmed)


def test_monitor_without_a_log_is_one_clear_error(store, monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nowhere" / "requests.db"
    assert monitor(store, monkeypatch, "--log", f"sqlite:///{missing}") == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "make serve" in err
