"""How a Keras model is trained: runtime set-up, the training loop, callbacks and `fit`.

`configure_runtime` must run before TensorFlow builds anything (it sets the precision
policy, threads, determinism and logical devices). `fit` builds, compiles and trains the
model and reports each epoch to a plain Python hook, so this module knows nothing about
MLflow. It trains with `EpochLoop`: Keras' own train step (forward pass, compiled loss,
loss scaling, optimizer) and Keras callbacks, with none of the per-step machinery of
`Model.fit` around it; under a configured `tf.distribute` strategy it uses `Model.fit`.

How it runs fast without changing the maths: bfloat16 compute with float32 weights where
the hardware has it, many steps per compiled call, batches gathered inside the graph from
the arrays' own memory, each batch in concurrent shards on a CPU's cores, XLA on GPUs only.
benchmarks/ measures each of these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainJob
from ..data.splits import NUM_CLASSES, Split
from ..errors import TrainingError
from . import models
from .callbacks import (
    Checkpoint,
    EpochHook,
    EpochReport,
    LearningRate,
    Resume,
    StopOnNaN,
    progress,
)
from .distributed import WorkerLoop
from .inputs import dataset
from .loop import EpochLoop
from .runtime import Runtime


@dataclass
class Result:
    model: keras.Model
    history: dict[str, list[float]]
    epochs_run: int
    initial_epoch: int


def fit(
    job: TrainJob,
    runtime: Runtime,
    train: Split,
    val: Split,
    *,
    steps_per_execution: int,
    on_epoch_end: EpochHook | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    resume: Resume | None = None,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
) -> Result:
    """Build, compile and train `job`'s model; raise `TrainingError` on divergence.

    Reads `job.model`, `job.optimizer` and `job.train`; `runtime` is what
    `configure_job(job)` set up.
    """
    cfg = job.train
    global_batch = cfg.batch_size
    with runtime.strategy.scope():
        if resume is not None:
            # The checkpoint carries the weights and the optimizer's state (moments, step).
            model = keras.saving.load_model(resume.model_path, safe_mode=True)
            optimizer, initial_epoch = model.optimizer, resume.epoch
        else:
            model = models.build(job.model)
            optimizer, initial_epoch = models.build_optimizer(job.optimizer), 0
        loss = cfg.loss
        if cfg.label_smoothing:
            loss = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
        models.compile_model(
            model,
            optimizer,
            loss,
            steps_per_execution=steps_per_execution,
            jit_compile=runtime.jit_compile,
        )

    nan_guard = StopOnNaN()
    callbacks: list[keras.callbacks.Callback] = [
        LearningRate(cfg, job.optimizer.learning_rate),
        nan_guard,
    ]
    if cfg.lr_schedule.name == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=cfg.lr_schedule.factor, patience=cfg.lr_schedule.patience
            )
        )
    if cfg.early_stopping.enabled:
        es = cfg.early_stopping
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=es.monitor,
                patience=es.patience,
                min_delta=es.min_delta,
                restore_best_weights=es.restore_best_weights,
            )
        )
    callbacks.extend(extra_callbacks or [])
    verbose, progress_callbacks = progress(cfg.verbose, cfg.epochs)
    callbacks.extend(progress_callbacks)
    if on_epoch_end is not None:
        callbacks.append(EpochReport(on_epoch_end))
    if checkpoint_dir is not None and cfg.checkpoint.enabled:
        # After the report: a checkpoint never gets ahead of the epochs the run has logged.
        callbacks.append(
            Checkpoint(checkpoint_dir, cfg.checkpoint.every_epochs, dict(checkpoint_meta or {}))
        )

    augment = cfg.augmentation if cfg.augment else False
    if runtime.task is not None:  # one worker of a multi-worker job (Model.fit cannot)
        with WorkerLoop(
            model,
            train,
            val,
            strategy=runtime.strategy,
            batch_size=global_batch,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            augment=augment,
            jit_compile=bool(model.jit_compile),
            stall_timeout_s=job.runtime.collective_timeout_s,
        ) as loop:
            history = loop.run(
                callbacks,
                epochs=cfg.epochs,
                initial_epoch=initial_epoch,
                verbose=cfg.verbose if runtime.chief else 0,
            )
    elif runtime.strategy is tf.distribute.get_strategy():  # the default: no tf.distribute
        # model.jit_compile: what compile() kept of the request (Keras turns XLA off under op
        # determinism and for layers that do not support it).
        with EpochLoop(
            model,
            train,
            val,
            batch_size=global_batch,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            augment=augment,
            steps_per_call=steps_per_execution,
            jit_compile=bool(model.jit_compile),
            shards=runtime.batch_shards,
        ) as loop:
            history = loop.run(
                callbacks, epochs=cfg.epochs, initial_epoch=initial_epoch, verbose=verbose
            )
    else:
        # Under a tf.distribute strategy (even with one replica), Keras' own loop feeds it.
        train_ds = dataset(
            train, batch_size=global_batch, shuffle=cfg.shuffle, seed=cfg.seed, augment=augment
        )
        val_ds = dataset(val, batch_size=max(global_batch, 1000))
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # the dataset shuffles, seeded
    if nan_guard.diverged_at is not None:
        epoch, batch = nan_guard.diverged_at
        raise TrainingError(
            f"loss became NaN/inf at epoch {epoch + 1} (batch {batch + 1}); training stopped. "
            "Lower optimizer.learning_rate or check the data"
        )
    values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return Result(
        model=model,
        history=values,
        epochs_run=len(values.get("loss", [])),
        initial_epoch=initial_epoch,
    )


def predict(model: keras.Model, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, 10) float32 for raw uint8 images.

    Batch by batch through the model's compiled predict step (`predict_on_batch`): the same
    batches and figures as `model.predict`, without the input pipeline it builds on every
    call (about 30 ms each, and evaluate calls it for every corruption)."""
    batches = [
        np.asarray(model.predict_on_batch(images[start : start + batch_size]), np.float32)
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches) if batches else np.zeros((0, NUM_CLASSES), np.float32)


def weights_digest(model: keras.Model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()
