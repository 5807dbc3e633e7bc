"""One training job: train a configured model and record everything in MLflow.

Used by the `train` stage (which also writes the DVC outputs) and by each sweep trial
(which writes nothing but its MLflow run). Wires `training` (Keras) to `tracking` (MLflow).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..config import RUN_SECTIONS, CalibrationConfig, PathsConfig, TrainJob
from ..data.splits import Split, load_split
from ..data.splits import digest as data_digest
from ..errors import ModelError, interruptible
from ..files import write_json
from ..tracking import lineage, logged_models, runs, store
from . import calibration, callbacks, curves, models
from .fit import Result, fit, predict
from .runtime import Runtime, configure_job

# Keys that change how a run is resumed, not what it computes.
NOT_IN_DIGEST = ("train.checkpoint.resume", "train.verbose")


@dataclass
class Outcome:
    run_id: str
    experiment_id: str
    model_uri: str
    model: Any
    history: dict[str, list[float]]
    metrics: dict[str, float]
    runtime: Runtime
    data_sha256: str
    test_sha256: str
    stopped_by_hook: bool
    initial_epoch: int
    calibration: calibration.Calibration


def run_params(job: TrainJob) -> dict[str, Any]:
    """Every resolved config value a run depends on, as flat `section.key` params."""
    params: dict[str, Any] = {}
    for name in RUN_SECTIONS:
        params.update({f"{name}.{k}": v for k, v in config.flatten(getattr(job, name)).items()})
    return params


def config_digest(params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if k not in NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def train(
    job: TrainJob,
    *,
    checkpoint_dir: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    epoch_hook: callbacks.EpochHook | None = None,
    log_model: bool = True,
) -> Outcome:
    """Train `job`'s model on the train/val splits in `job.paths.processed` inside an MLflow run.

    Args:
        job: the validated config (`TrainJob.from_config(composed)`).
        checkpoint_dir: where to checkpoint each epoch (and resume from when
            `train.checkpoint.resume`); None: no checkpoints (multirun jobs, sweep trials).
        run_name: the MLflow run's name; None: the DVC experiment's, else model-optimizer-time.
        parent_run_id: nest the run under this one (a sweep's parent run).
        tags: extra MLflow run tags.
        epoch_hook: called with (epoch, logs) after each epoch; True stops training.
        log_model: False (sweep trials) skips the model artifact and its summary; the
            returned `model_uri` is then empty.
    """
    processed_dir = job.paths.processed
    runtime = configure_job(job)
    splits = {name: load_split(processed_dir, name) for name in ("train", "val", "test")}
    data_sha256 = data_digest(splits)
    test_sha256 = splits["test"].sha256()
    params = run_params(job)
    digest = config_digest(params)

    resume = None
    if checkpoint_dir and job.train.checkpoint.resume:
        resume = callbacks.find_checkpoint(checkpoint_dir, digest)
        if resume is None:
            print(f"train: no checkpoint of this config in {checkpoint_dir}; starting from epoch 1")

    # Keras 3 cannot run several steps per call across replicas (its multi-step loop fails
    # to feed MirroredStrategy's placeholders), so distributed training steps one at a time.
    steps_per_execution = job.runtime.steps_per_execution if runtime.replicas == 1 else 1
    if not runtime.chief:
        # Another worker of a multi-worker job: it trains its share of every batch in step
        # with the chief, which alone records the run and writes outputs (one run per job).
        started = time.perf_counter()
        result = fit(job, runtime, splits["train"], splits["val"], steps_per_execution=1)
        return Outcome(
            run_id="",
            experiment_id="",
            model_uri="",
            model=result.model,
            history=result.history,
            metrics=final_metrics(result, time.perf_counter() - started),
            runtime=runtime,
            data_sha256=data_sha256,
            test_sha256=test_sha256,
            stopped_by_hook=False,
            initial_epoch=result.initial_epoch,
            calibration=calibration.IDENTITY,
        )
    experiment_id = store.connect(job.tracking)
    for run_id in runs.reap_orphans(experiment_id):
        print(f"train: run {run_id} had lost its process (killed); marked KILLED")
    run_tags = {
        **lineage.git_state(),
        **lineage.dvc_experiment(),
        **lineage.dvc_lock_hashes("dvc.lock", [processed_dir]),
        "data.sha256": data_sha256,
        "data.test_sha256": test_sha256,
        "config.digest": digest,
        **(tags or {}),
    }
    if run_name is None:
        # Not MLflow's generated name: it comes from Python's `random`, which the seeded
        # runtime has just reset, so every run with the same seed would get the same one.
        run_name = run_tags.get("dvc.experiment") or (
            f"{job.model.name}-{job.optimizer.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    stopped_by_hook = False

    with (
        interruptible() as raise_pending,
        runs.run(
            experiment_id,
            run_name=run_name,
            tags=run_tags,
            parent_run_id=parent_run_id,
            resume_run_id=resume.meta.get("run_id") if resume else None,
        ) as run_id,
    ):
        if resume is None:
            runs.log_params(
                {
                    **params,
                    **runtime.describe(),
                    "runtime.resolved_steps_per_execution": steps_per_execution,
                    "tracking.experiment_name": job.tracking.experiment_name,
                }
            )
            for name in ("train", "val"):
                runs.log_dataset(
                    splits[name].images,
                    splits[name].labels,
                    name=f"mnist-{name}",
                    sha256=data_sha256,
                    source=str(Path(processed_dir) / f"{name}.npz"),
                    context="training" if name == "train" else "validation",
                )
        else:
            runs.set_tags({"resumed_from_epoch": resume.epoch})

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> bool:
            nonlocal stopped_by_hook
            runs.log_metrics(logs, step=epoch + 1)
            stopped_by_hook = bool(epoch_hook and epoch_hook(epoch, logs))
            return stopped_by_hook

        started = time.perf_counter()
        result = fit(
            job,
            runtime,
            splits["train"],
            splits["val"],
            steps_per_execution=steps_per_execution,
            on_epoch_end=on_epoch_end,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            checkpoint_meta={"config_digest": digest, "run_id": run_id},
            resume=resume,
            extra_callbacks=[callbacks.Calls(raise_pending)],
        )
        raise_pending()  # a signal that came during the last epoch's writes
        wall = time.perf_counter() - started
        metrics = final_metrics(result, wall)
        runs.log_metrics(metrics)
        model = models.as_float32(result.model, job.model)
        fitted = calibrate(model, splits["val"], job.train.calibration)
        runs.log_metrics(calibration_metrics(fitted))
        if log_model:
            runs.log_text(models.summary(model), "model_summary.txt")
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "training_curves.png"
            curves.plot_history_png(png, result.history, title=run_name or "")
            runs.log_artifact(png)
        model_uri = ""
        if log_model:
            model_uri = log_served(
                model, fitted, tags={"data.sha256": data_sha256}, int8_images=splits["val"].images
            )
            runs.set_tags({"model_uri": model_uri})

    if checkpoint_dir:
        callbacks.clear_checkpoint(checkpoint_dir)
    return Outcome(
        run_id=run_id,
        experiment_id=experiment_id,
        model_uri=model_uri,
        model=model,
        history=result.history,
        metrics=metrics,
        runtime=runtime,
        data_sha256=data_sha256,
        test_sha256=test_sha256,
        stopped_by_hook=stopped_by_hook,
        initial_epoch=result.initial_epoch,
        calibration=fitted,
    )


def log_served(
    model: Any,
    fitted: calibration.Calibration,
    tags: dict[str, str] | None = None,
    int8_images: Any = None,
) -> str:
    """Export `model` to ONNX and log what is served (`logged_models.log_served_model`):
    the ONNX graph, the `.keras` file and the calibration; with `int8_images` (the
    validation split), also the graph quantized to int8 on them (`models.quantize_onnx`),
    which the gate measures and `make serve ARGS=--int8` serves. The active run records the
    files' sizes and how long the export and the quantization took. A graph that cannot be
    quantized is logged without its int8 copy, with a warning. Returns the model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        keras_file, onnx_file = Path(tmp) / "model.keras", Path(tmp) / "model.onnx"
        model.save(keras_file)
        started = time.perf_counter()
        models.export_onnx(model, onnx_file)
        measured = {
            "onnx_export_s": time.perf_counter() - started,
            "onnx_bytes": float(onnx_file.stat().st_size),
            "keras_bytes": float(keras_file.stat().st_size),
        }
        int8_file: Path | None = None
        if int8_images is not None:
            started = time.perf_counter()
            int8_file = Path(tmp) / "model.int8.onnx"
            try:
                models.quantize_onnx(onnx_file, int8_file, int8_images)
            except ModelError as err:
                print(f"train: WARNING: no int8 graph: {err}", file=sys.stderr, flush=True)
                int8_file = None
            else:
                measured["onnx_int8_quantize_s"] = time.perf_counter() - started
                measured["onnx_int8_bytes"] = float(int8_file.stat().st_size)
        runs.log_metrics(measured)
        return logged_models.log_served_model(
            keras_file, onnx_file, calibration=fitted.to_dict(), tags=tags, int8_file=int8_file
        )


def calibrate(model: Any, val: Split, cfg: CalibrationConfig) -> calibration.Calibration:
    """The temperature and the abstention threshold, fitted on the validation split's
    outputs of the model as it will be saved (float32)."""
    return calibration.fit(
        predict(model, val.images),
        val.labels,
        target=cfg.selective_accuracy,
        scale_temperature=cfg.temperature_scaling,
        val_sha256=val.sha256(),
    )


def calibration_metrics(fitted: calibration.Calibration) -> dict[str, float]:
    """The run's record of its calibration (the model version carries the values)."""
    return {
        "calibration_temperature": fitted.temperature,
        "calibration_threshold": fitted.threshold,
        "val_coverage": fitted.val_coverage,
        "val_nll_uncalibrated": fitted.val_nll_before,
        "val_nll": fitted.val_nll_after,
        "val_ece_uncalibrated": fitted.val_ece_before,
        "val_ece": fitted.val_ece_after,
    }


def final_metrics(result: Result, wall_s: float) -> dict[str, float]:
    history = result.history
    metrics: dict[str, float] = {"epochs_run": float(result.epochs_run), "train_time_s": wall_s}
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if history.get(key):
            metrics[f"final_{key}"] = history[key][-1]
    if history.get("val_accuracy"):
        metrics["best_val_accuracy"] = max(history["val_accuracy"])
    times = history.get("epoch_time_s") or []
    if len(times) > 1:
        metrics["epoch_time_s_median"] = statistics.median(times[1:])
    elif times:
        metrics["epoch_time_s_median"] = times[0]
    return metrics


def write_outputs(outcome: Outcome, paths: PathsConfig) -> None:
    """The train stage's DVC outputs: model, run id, metrics and per-epoch history."""
    models.save(outcome.model, paths.model)
    write_json(
        paths.run,
        {
            "run_id": outcome.run_id,
            "experiment_id": outcome.experiment_id,
            "model_uri": outcome.model_uri,
            "data_sha256": outcome.data_sha256,
            "test_sha256": outcome.test_sha256,
            "calibration": outcome.calibration.to_dict(),
        },
    )
    write_json(paths.train_metrics, {k: round(v, 6) for k, v in outcome.metrics.items()})
    curves.write_history_csv(
        paths.train_history, outcome.history, first_epoch=outcome.initial_epoch + 1
    )
