"""Monitoring on the team stack: `make serve`'s server logs its answers to the team's
PostgreSQL (the `monitoring` database `team env` exports), and `mnist-pipeline monitor` reads
them there and logs its windows to the team's MLflow server."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
from helpers import config as test_config
from helpers import tiny_store
from helpers.digits import synthetic_digits
from helpers.serving import post

from mnist_pipeline import cli
from mnist_pipeline.config.loading import checkout_section, tracking_config
from mnist_pipeline.data import corruptions
from mnist_pipeline.data.splits import Split
from mnist_pipeline.monitoring.monitor import ALARM_EXIT
from mnist_pipeline.monitoring.requestlog import LOG_ENV, RequestLog
from mnist_pipeline.serve.model_server import model_server_command
from mnist_pipeline.team.stack import MONITORING_ENV

pytestmark = [pytest.mark.slow, pytest.mark.team]

WINDOW = 100


def champion_on_the_server(root, images, labels) -> str:
    """A small model logged and registered on the team server as the train and evaluate
    stages would (its ONNX export, its reference); its version URI."""
    import keras
    import mlflow

    from mnist_pipeline.evaluation import promotion
    from mnist_pipeline.tracking import registry
    from mnist_pipeline.training import calibration, job

    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((28, 28), dtype="uint8"),
            keras.layers.Rescaling(1 / 255, dtype="float32"),
            keras.layers.Flatten(dtype="float32"),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    train, train_labels = synthetic_digits(600, seed=1)
    model.fit(train, train_labels, epochs=3, verbose=0)
    mlflow.set_experiment("team-monitoring")
    with mlflow.start_run() as run:
        uri = job.log_served(model, calibration.IDENTITY)
        promotion.log_reference(
            run.info.run_id, Split(images, labels), model.predict(images, verbose=0)
        )
    version = registry.register(uri, "team-digits", tags={})
    return registry.version_uri("team-digits", str(version.version))


def test_monitor_on_the_team_stack_logs_to_postgres_and_the_server(
    team_stack, tmp_path, monkeypatch, capsys
):
    import mlflow

    # What `make team-env` prints, as a member's shell would have it.
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in team_stack.exports().splitlines()
    )
    assert MONITORING_ENV == LOG_ENV
    assert exports[LOG_ENV] == team_stack.request_log
    assert team_stack.request_log.startswith("postgresql://")
    root = tmp_path / "checkout"
    root.mkdir()
    test_config.write_params(root)
    for key, value in exports.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    mlflow.set_tracking_uri(exports["MLFLOW_TRACKING_URI"])
    images, labels = synthetic_digits(1000, seed=3)
    uri = champion_on_the_server(root, images, labels)

    port = tiny_store.free_port()
    monitoring = checkout_section("monitoring", root).model_copy(update={"flush_interval_s": 0.1})
    command = model_server_command(
        tracking_config(root),
        model_uri=uri,
        port=port,
        monitoring=monitoring,
        cache=str(tmp_path / "cache"),
    )
    assert command.env_overrides["MNIST_SERVE_LOG"] == team_stack.request_log
    with tiny_store.running(command, tmp_path / "server.log"):

        def send(batch: np.ndarray) -> None:
            for start in range(0, len(batch), 10):
                status, body = post(port, {"inputs": batch[start : start + 10].tolist()})
                assert status == 200, body

        def wait_for(rows: int) -> None:
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/version") as answer:
                    if json.loads(answer.read())["log"]["rows_written"] >= rows:
                        return
                assert time.monotonic() < deadline, "the server did not log its answers"
                time.sleep(0.05)

        send(images[: 2 * WINDOW])
        wait_for(2 * WINDOW)
        log = RequestLog(team_stack.request_log)
        try:
            assert log.count() == 2 * WINDOW
            assert log.latest_version() == ("team-digits", "1")
        finally:
            log.close()
        assert (
            cli.main(
                [
                    "monitor",
                    "--window",
                    str(WINDOW),
                    "--windows",
                    "2",
                    "--report",
                    str(tmp_path / "clean.html"),
                ]
            )
            == 0
        )
        send(corruptions.corrupt(images[2 * WINDOW : 3 * WINDOW], "fog", seed=0))
        wait_for(3 * WINDOW)
        assert (
            cli.main(["monitor", "--window", str(WINDOW), "--report", str(tmp_path / "fog.html")])
            == ALARM_EXIT
        )
    out = capsys.readouterr().out
    assert "in experiment 'monitoring' of http://127.0.0.1" in out

    experiment = mlflow.get_experiment_by_name("monitoring")
    found = mlflow.search_runs([experiment.experiment_id], output_format="list")
    assert sorted(r.data.tags["alarm"] for r in found) == ["false", "false", "true"]
