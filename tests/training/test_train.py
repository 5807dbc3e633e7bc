"""The train stage: a real run logged to MLflow, statuses on failure, determinism, `-S`."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
from helpers import config as test_config
from helpers import empty_store
from helpers import repo
from helpers.digits import synthetic_digits

from mnist_pipeline import config
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.errors import ConfigError, Interrupted
from mnist_pipeline.evaluation import promotion
from mnist_pipeline.tracking.runs import GIT_COMMIT
from mnist_pipeline.training import calibration, job, models
from mnist_pipeline.training.callbacks import onecycle_factor, schedule_factor
from mnist_pipeline.training.fit import weights_digest
from mnist_pipeline.training.runtime import (
    cpu_bf16_unit,
    cpu_precision,
    op_threads,
    resolve_precision,
    resolve_shards,
)


@pytest.fixture()
def processed(tmp_path):
    for name, n, seed in (("train", 300, 1), ("val", 100, 2), ("test", 100, 3)):
        save_split(tmp_path / "processed", name, Split(*synthetic_digits(n, seed)))
    return tmp_path / "processed"


def test_one_epoch_run_is_recorded_in_mlflow(tmp_path, processed, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store.place(tmp_path / "store.db"))
    train_job = test_config.train_job(
        model={"name": "mlp", "hidden_units": [32, 16]},
        optimizer={"name": "sgd"},
        train={"epochs": 1, "verbose": 0, "batch_size": 64},
        paths={"processed": str(processed)},
    )
    outcome = job.train(train_job, checkpoint_dir=str(tmp_path / "ckpt"))
    run = MlflowClient().get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert re.fullmatch(r"mlp-sgd-\d{8}-\d{6}", run.info.run_name), run.info.run_name
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri()), (
        "artifacts live beside the store, not under the current directory"
    )
    assert run.data.params["model.hidden_units"] == "[32, 16]"
    assert run.data.params["optimizer.learning_rate"] == "0.01"
    assert run.data.params["train.batch_size"] == "64"
    assert run.data.params["runtime.resolved_precision"] in ("float32", "mixed_bfloat16")
    for key in ("final_loss", "final_val_accuracy", "epochs_run", "epoch_time_s_median"):
        assert key in run.data.metrics
    history = MlflowClient().get_metric_history(outcome.run_id, "learning_rate")
    assert [m.value for m in history] == [pytest.approx(0.01)]
    assert run.data.tags["data.sha256"] == outcome.data_sha256
    inputs = run.inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} == {outcome.data_sha256[:36]}
    artifacts = {a.path for a in MlflowClient().list_artifacts(outcome.run_id)}
    assert {"training_curves.png", "model_summary.txt"} <= artifacts

    images = synthetic_digits(5, seed=9)[0]
    keras_model = promotion.load_keras(outcome.model_uri)  # the .keras inside the pyfunc
    pyfunc = mlflow.pyfunc.load_model(outcome.model_uri)
    # The served model applies the temperature the run fitted on the validation split.
    temperature = outcome.calibration.temperature
    assert temperature != 1.0 and run.data.metrics["calibration_temperature"] == temperature
    np.testing.assert_allclose(
        pyfunc.predict(images),
        calibration.scale(keras_model.predict(images, verbose=0), temperature),
        atol=1e-6,
    )
    spec = pyfunc.metadata.get_input_schema().inputs[0]
    assert spec.type == np.dtype("uint8") and spec.shape == (-1, 28, 28)
    assert not (tmp_path / "ckpt" / "state.json").exists(), "checkpoint cleared after success"


def test_outputs_are_written_for_dvc(tmp_path, processed, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store.place(tmp_path / "store.db"))
    outcome = job.train(
        test_config.train_job(
            model={"name": "mlp", "hidden_units": [8]},
            optimizer={"name": "adam"},
            train={"epochs": 2, "verbose": 0},
            paths={"processed": str(processed)},
        )
    )
    paths = test_config.section(
        "paths",
        model=str(tmp_path / "out/model.keras"),
        run=str(tmp_path / "out/run.json"),
        train_metrics=str(tmp_path / "out/train.json"),
        train_history=str(tmp_path / "out/history.csv"),
    )
    job.write_outputs(outcome, paths)
    assert json.loads((tmp_path / "out/run.json").read_text())["run_id"] == outcome.run_id
    assert json.loads((tmp_path / "out/train.json").read_text())["epochs_run"] == 2
    rows = (tmp_path / "out/history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,accuracy,val_loss,val_accuracy,learning_rate")
    assert len(rows) == 3
    loaded = models.load(tmp_path / "out/model.keras")
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}, (
        "saved models serve in float32"
    )
    assert weights_digest(loaded) == weights_digest(outcome.model)


@pytest.mark.parametrize(
    "overrides, digest",
    [
        ((), "96b2782ffcf6e2afda11df818b1ba3b3f9557240b57baa4d1d3fccdc65e10313"),
        (
            ("runtime.jit_compile=false", "optimizer.learning_rate=1"),
            "041a46b212afd1c69e7ff9e7e9a6ed77fb7bd699fa8775fb4020eef6a6dbb6f1",
        ),
    ],
)
def test_run_params_and_config_digest_are_unchanged(overrides, digest):
    # Pinned digests (the dataclass schema's, plus runtime.workers, collective_timeout_s,
    # train.label_smoothing, train.augmentation (its photometric_share too),
    # train.calibration and runtime.batch_shards):
    # a run resumes from its checkpoints, and compares with earlier runs, only while these
    # stay the same; a change to them must be deliberate.
    train_job = config.TrainJob.from_config(test_config.composed(*overrides))
    params = job.run_params(train_job)
    assert {key.split(".")[0] for key in params} == set(config.RUN_SECTIONS)
    assert params["model.hidden_units"] == [512, 256]
    assert job.config_digest(params) == digest


@pytest.mark.parametrize(
    "name, epoch, expected",
    [
        ("constant", 5, 1.0),
        ("cosine", 0, 1.0),
        ("cosine", 10, 0.0),
        ("step", 10, 0.5),
    ],
)
def test_schedule_factors(name, epoch, expected):
    cfg = test_config.section("train", epochs=10, lr_schedule={"name": name, "step_epochs": 10})
    assert schedule_factor(cfg, epoch) == pytest.approx(expected, abs=1e-9)


def test_onecycle_rises_from_a_25th_to_the_peak_then_anneals_to_the_floor():
    cfg = test_config.section(
        "train", epochs=4, lr_schedule={"name": "onecycle", "warmup_epochs": 1, "min_factor": 0.01}
    )
    assert onecycle_factor(cfg, 0.0) == pytest.approx(0.04)
    assert onecycle_factor(cfg, 0.5) == pytest.approx(0.04 + 0.96 * 0.5)
    assert onecycle_factor(cfg, 1.0) == pytest.approx(1.0)
    assert onecycle_factor(cfg, 2.5) == pytest.approx(0.01 + 0.99 * 0.5)  # half-way down
    assert onecycle_factor(cfg, 4.0) == pytest.approx(0.01)
    assert schedule_factor(cfg, 1) == onecycle_factor(cfg, 1.0)  # epoch starts agree
    rates = [onecycle_factor(cfg, step / 10) for step in range(41)]
    peak = rates.index(max(rates))
    assert peak == 10 and all(a < b for a, b in zip(rates[:peak], rates[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :], strict=False))


def test_schedules_hold_their_floor_after_the_last_epoch():
    # Keras' schedules clamp at the end of their decay: a run resumed or extended past its
    # last epoch stays at the floor instead of climbing back up the cosine.
    for name in ("cosine", "onecycle"):
        cfg = test_config.section(
            "train", epochs=10, lr_schedule={"name": name, "warmup_epochs": 2, "min_factor": 0.1}
        )
        assert [schedule_factor(cfg, e) for e in (12, 15, 30)] == pytest.approx([0.1] * 3)
    step = test_config.section(
        "train", epochs=10, lr_schedule={"name": "step", "step_epochs": 3, "factor": 0.5}
    )
    assert [schedule_factor(step, e) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]


def test_warmup_ramps_up():
    cfg = test_config.section(
        "train", epochs=10, lr_schedule={"name": "cosine", "warmup_epochs": 2}
    )
    assert [round(schedule_factor(cfg, e), 3) for e in range(3)] == [0.333, 0.667, 1.0]


# --- subprocess runs in a throwaway repository ---------------------------------------------


@pytest.fixture()
def prepared_repo(tmp_path):
    path = repo.make(tmp_path / "repo", store=True)
    repo.run(["dvc", "repro", "preprocess"], path)
    return path


TRAIN = "pipelines/train.py"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_run_killed(prepared_repo, sig):
    from mlflow import MlflowClient

    proc = repo.start(
        repo.python(TRAIN, "train.epochs=500", "train.checkpoint.enabled=false"), prepared_repo
    )
    repo.wait_for_epoch(prepared_repo / "mlflow.db", 1, proc)
    code, err = repo.stop(proc, sig)
    assert code != 0, f"the stage ignored {sig.name}; its stderr ends:\n{err[-3000:]}"
    client = MlflowClient(tracking_uri=repo.store(prepared_repo))
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"], f"stderr ends:\n{err[-3000:]}"
    assert not (prepared_repo / "models/model.keras").exists()


@pytest.mark.slow
def test_nan_loss_fails_the_run_and_writes_no_model(prepared_repo):
    from mlflow import MlflowClient

    done = repo.run(
        repo.python(TRAIN, "optimizer.learning_rate=1e12", "train.epochs=3"),
        prepared_repo,
        check=False,
    )
    assert done.returncode == 1
    assert "NaN" in done.stderr and "Traceback" not in done.stderr
    client = MlflowClient(tracking_uri=repo.store(prepared_repo))
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (prepared_repo / "models/model.keras").exists()


@pytest.mark.slow
def test_seeded_deterministic_runs_give_identical_weights(prepared_repo):
    digests, metrics = [], []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        repo.run(
            repo.python(
                TRAIN,
                "runtime.deterministic=true",
                "train.epochs=1",
                f"train.seed={seed}",
                f"paths.model=models/{name}.keras",
                f"paths.train_metrics=metrics/{name}.json",
            ),
            prepared_repo,
        )
        digests.append(weights_digest(models.load(prepared_repo / f"models/{name}.keras")))
        values = json.loads((prepared_repo / f"metrics/{name}.json").read_text())
        metrics.append({k: v for k, v in values.items() if "time" not in k})
    assert digests[0] == digests[1]
    assert metrics[0] == metrics[1] and "final_val_accuracy" in metrics[0]
    assert digests[0] != digests[2], "a different seed must give different weights"


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(prepared_repo):
    from mlflow import MlflowClient

    done = repo.run(
        repo.python(
            TRAIN, "runtime.distribute=mirrored", "runtime.logical_devices=2", "train.epochs=1"
        ),
        prepared_repo,
    )
    run_id = json.loads((prepared_repo / "models/run.json").read_text())["run_id"]
    params = MlflowClient(tracking_uri=repo.store(prepared_repo)).get_run(run_id).data.params
    assert params["runtime.replicas"] == "2", done.stdout


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(prepared_repo):
    from mlflow import MlflowClient

    proc = repo.start(repo.python(TRAIN, "train.epochs=6"), prepared_repo)
    repo.wait_for_epoch(prepared_repo / "mlflow.db", 2, proc)
    import time

    saved = prepared_repo / ".checkpoints/train/state.json"
    deadline = time.monotonic() + 120  # the epoch's checkpoint lands beside its metrics
    while not (saved.exists() and json.loads(saved.read_text())["epoch"] >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint of epoch 2"
        time.sleep(0.02)
    repo.stop(proc, signal.SIGKILL)
    state = json.loads(saved.read_text())
    assert state["epoch"] >= 2
    repo.run(repo.python(TRAIN, "train.epochs=6", "train.checkpoint.resume=true"), prepared_repo)
    run_id = json.loads((prepared_repo / "models/run.json").read_text())["run_id"]
    assert run_id == state["run_id"], "the interrupted run is continued, not a new one"
    client = MlflowClient(tracking_uri=repo.store(prepared_repo))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(state["epoch"])
    steps = sorted({m.step for m in client.get_metric_history(run_id, "loss")})
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_dvc_exp_run_set_values_reach_the_model(prepared_repo):
    from mlflow import MlflowClient

    repo.run(["git", "add", "-A"], prepared_repo)
    repo.run(["git", "commit", "-qm", "lock"], prepared_repo)
    repo.run(
        [
            "dvc",
            "exp",
            "run",
            "-S",
            "model.hidden_units=[24,12]",
            "-S",
            "optimizer.learning_rate=0.05",
            "-S",
            "train.epochs=1",
        ],
        prepared_repo,
    )
    model = models.load(prepared_repo / "models/model.keras")
    import keras

    dense = [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert dense == [24, 12, 10]
    run_id = json.loads((prepared_repo / "models/run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri=repo.store(prepared_repo)).get_run(run_id)
    assert run.data.params["optimizer.learning_rate"] == "0.05"
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags.get("dvc.experiment"), "the DVC experiment name is recorded"
    assert run.info.run_name == run.data.tags["dvc.experiment"], "runs are named as in dvc exp show"
    head = repo.run(["git", "rev-parse", "HEAD"], prepared_repo).stdout.strip()
    assert run.data.tags[GIT_COMMIT] == head
    assert run.data.tags["git.dirty"] == "true", "-S changed params.yaml before training"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_dropped_in_a_finaliser_still_stops_training():
    # TensorFlow tears down each epoch's input iterator in a finaliser, right when a test (or
    # a user) sends a signal after an epoch; an exception raised there is dropped.
    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs in here; its exception is dropped
                pass

    with job.interruptible() as raise_pending:
        Finaliser()
        survived = True  # execution went on past the signal
        with pytest.raises(Interrupted, match=f"signal {int(signal.SIGTERM)}"):
            raise_pending()
    assert survived


def test_a_signal_while_tensorflow_builds_an_ops_error_keeps_that_error():
    # A worker's all-reduce fails (its peer was killed) just as the coordinator sends it
    # SIGTERM: the signal lands while TensorFlow builds the op's exception for its C++ caller.
    # Raised there, pybind11 would replace both with a RuntimeError and a traceback.
    import sys

    import tensorflow as tf

    gather = tf.function(lambda i: tf.gather(tf.constant([1, 2]), i))
    gather(tf.constant(0))
    sent = []

    def signal_on_building_the_error(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith("errors_impl.py") and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    with job.interruptible() as raise_pending:
        sys.setprofile(signal_on_building_the_error)
        try:
            with pytest.raises(tf.errors.InvalidArgumentError, match="indices = 5"):
                gather(tf.constant(5))
        finally:
            sys.setprofile(None)
        assert sent
        with pytest.raises(Interrupted, match=f"signal {int(signal.SIGTERM)}"):
            raise_pending()


# --- runtime.precision: auto ---------------------------------------------------------------


def test_cpu_bf16_unit_reads_the_flags():
    assert cpu_bf16_unit("fpu avx512f avx512_bf16 amx_bf16 amx_tile") == "amx"
    assert cpu_bf16_unit("fpu avx512f avx512_bf16") == "avx512"
    assert cpu_bf16_unit("fpu avx2") is None


@pytest.mark.parametrize(
    "unit, model, expected",
    [
        ("amx", "mlp", "mixed_bfloat16"),
        ("amx", "cnn", "mixed_bfloat16"),
        ("amx", "rnn", "mixed_bfloat16"),
        ("avx512", "mlp", "mixed_bfloat16"),
        ("avx512", "rnn", "mixed_bfloat16"),
        ("avx512", "cnn", "mixed_bfloat16"),  # 1.35-1.5x on an AMD EPYC (cnn_ablation.py)
        (None, "mlp", "float32"),
        (None, "cnn", "float32"),
    ],
)
def test_auto_precision_follows_what_was_measured_per_layer_kind(unit, model, expected):
    assert cpu_precision(unit, model) == expected


def test_an_explicit_precision_is_kept_whatever_the_model():
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        assert resolve_precision(precision, "cnn") == precision
    assert resolve_precision("auto", "cnn") == cpu_precision(cpu_bf16_unit(), "cnn")


def _shards(batch_size=128, batch_statistics=False, gpu=False, cores=2, **runtime):
    cfg = test_config.section("runtime", **runtime)
    return resolve_shards(
        cfg, batch_size=batch_size, batch_statistics=batch_statistics, on_gpu=gpu, cores=cores
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ({}, 2),  # 2 cores, batch 128: 2 shards of 64 (the measured gain)
        ({"cores": 16}, 2),  # at least 64 images a shard
        ({"batch_size": 512, "cores": 16}, 8),
        ({"batch_size": 100}, 1),  # 2 shards would hold fewer than 64 images
        ({"cores": 1}, 1),
        ({"intra_op_threads": 1}, 1),  # a sweep worker given one thread
        ({"inter_op_threads": 1}, 1),  # one op at a time: shards could not run side by side
        ({"batch_size": None}, 1),  # no batch size given (benchmarks configuring threads only)
        ({"gpu": True}, 1),
        ({"batch_statistics": True}, 1),  # batch norm: a shard's statistics would differ
        ({"distribute": "mirrored"}, 1),
        ({"batch_shards": 3}, 3),  # asked for: kept
        ({"batch_shards": 1, "cores": 16}, 1),
    ],
)
def test_auto_batch_shards_are_one_per_core_only_where_the_step_stays_the_same(case, expected):
    assert _shards(**case) == expected


@pytest.mark.parametrize(
    ("runtime", "shards", "cores", "expected"),
    [
        ({}, 2, 2, 1),  # the stage here: one thread for each shard's ops
        ({}, 2, 16, 8),
        ({"intra_op_threads": 2}, 2, 16, 1),  # a sweep worker's 2 cores, shared out
        ({"intra_op_threads": 3}, 1, 16, 3),
        ({}, 1, 16, 0),  # unsharded: TensorFlow decides
    ],
)
def test_batch_shards_share_out_the_cores_for_ops(runtime, shards, cores, expected):
    assert op_threads(test_config.section("runtime", **runtime), shards, cores) == expected


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ({"batch_shards": 2, "batch_statistics": True}, "batch normalization"),
        ({"batch_shards": 2, "distribute": "multi_worker"}, "runtime.distribute=multi_worker"),
        ({"batch_shards": 64, "batch_size": 32}, "train.batch_size (32)"),
    ],
)
def test_batch_shards_that_would_change_the_step_are_refused(case, names):
    with pytest.raises(ConfigError) as err:
        _shards(**case)
    assert "runtime.batch_shards" in str(err.value) and names in str(err.value)


@pytest.mark.parametrize("value", [0, 65, "two", -1, 2.0, True])
def test_batch_shards_config_is_auto_or_a_count(value):
    with pytest.raises(ConfigError) as err:
        test_config.section("runtime", batch_shards=value)
    assert str(err.value) == (
        f"config 'runtime.batch_shards': got {value!r}, expected auto or an integer in [1, 64]"
    )
    for good in ("auto", 1, 64):
        assert test_config.section("runtime", batch_shards=good).batch_shards == good


def test_batch_statistics_are_those_of_batch_normalization():
    assert not models.batch_statistics(test_config.section("model", name="mlp"))
    assert not models.batch_statistics(test_config.section("model", name="rnn"))
    assert models.batch_statistics(test_config.section("model", name="cnn", batch_norm=True))
    assert not models.batch_statistics(test_config.section("model", name="cnn", batch_norm=False))
