"""Keras callbacks of a training job: learning-rate schedule, NaN stop, signal checks, the
per-epoch report hook and resumable checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..config import TrainConfig
from ..files import atomic_path, write_json

# Called after each epoch with its logs; returning True stops training after that epoch.
EpochHook = Callable[[int, dict[str, float]], bool | None]


# --- callbacks -----------------------------------------------------------------------------


def schedule_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for `epoch` (0-based) under `train.lr_schedule`."""
    sched = cfg.lr_schedule
    if sched.name == "onecycle":  # its own warm-up, from lr/25
        return onecycle_factor(cfg, float(epoch))
    if sched.warmup_epochs and epoch < sched.warmup_epochs:
        return (epoch + 1) / (sched.warmup_epochs + 1)
    return _at(_keras_schedule(cfg), epoch - sched.warmup_epochs)  # after the warm-up


# Where one-cycle's warm-up starts: lr/25, as in Smith's one-cycle policy and PyTorch's
# OneCycleLR (`div_factor=25`); a start from 0 would waste the first group of steps.
ONECYCLE_START = 1 / 25


def onecycle_factor(cfg: TrainConfig, progress: float) -> float:
    """Learning-rate multiplier at `progress` epochs into the run (fractional) under
    `onecycle`: linear from 1/25 to 1 over `warmup_epochs`, then a cosine to `min_factor`."""
    return _at(_keras_schedule(cfg), progress)


def _keras_schedule(cfg: TrainConfig) -> keras.optimizers.schedules.LearningRateSchedule | None:
    """`train.lr_schedule` as Keras' schedule of the multiplier of the base rate, with epochs
    (fractional for onecycle) as its steps; None where the rate is constant (constant, and
    plateau, whose reductions `ReduceLROnPlateau` makes).

    The multiplier is set from callbacks, not by handing Keras the schedule: onecycle moves
    before each group of steps, plateau hands the rate to `ReduceLROnPlateau` after the
    warm-up, and a resumed run continues from its epoch. Computed in float64, like the
    arithmetic it replaces: the rates, and so the trained weights, stay the same.
    """
    sched, schedules = cfg.lr_schedule, keras.optimizers.schedules
    warmup, one = sched.warmup_epochs, np.float64(1.0)
    if sched.name == "onecycle":
        return schedules.CosineDecay(
            np.float64(ONECYCLE_START),
            cfg.epochs - warmup,
            alpha=sched.min_factor,
            warmup_target=one,
            warmup_steps=warmup,
        )
    # cosine and step: counted from the end of schedule_factor's own warm-up
    if sched.name == "cosine":
        return schedules.CosineDecay(one, max(cfg.epochs - warmup, 1), alpha=sched.min_factor)
    if sched.name == "step":
        return schedules.ExponentialDecay(one, sched.step_epochs, sched.factor, staircase=True)
    return None


def _at(schedule: keras.optimizers.schedules.LearningRateSchedule | None, step: float) -> float:
    # float64 in and out (a Python float step would go through float32 first)
    return 1.0 if schedule is None else float(schedule(np.float64(step)))


class LearningRate(keras.callbacks.LearningRateScheduler):
    """Keras' scheduler with our schedule: sets each epoch's rate from `schedule_factor` and
    logs it as `learning_rate`. Under `plateau`, after the warm-up, it keeps the rate it
    finds: `ReduceLROnPlateau` owns it from then on. Under `onecycle` it also sets the rate
    before every group of steps (the logged rate is then the epoch's last)."""

    def __init__(self, cfg: TrainConfig, base_lr: float) -> None:
        def rate(epoch: int, current: float) -> float:
            if cfg.lr_schedule.name == "plateau" and epoch >= cfg.lr_schedule.warmup_epochs:
                return current
            return base_lr * schedule_factor(cfg, epoch)

        super().__init__(rate)
        self.cfg, self.base_lr, self.epoch = cfg, base_lr, 0
        self.onecycle = _keras_schedule(cfg) if cfg.lr_schedule.name == "onecycle" else None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # onecycle moves within the epoch: before each group of steps (`batch` is the
        # group's first step), at the fraction of the epoch done.
        steps = self.params.get("steps") if self.params else None
        if self.onecycle is not None and steps:
            progress = self.epoch + batch / steps
            self.model.optimizer.learning_rate = self.base_lr * _at(self.onecycle, progress)


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss and remembers where it happened.

    Not `keras.callbacks.TerminateOnNaN`: it keeps no record of the epoch (the error message
    names it) and prints a line of its own; a subclass would test the loss a second time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.diverged_at: tuple[int, int] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = (self.epoch, batch)
            self.model.stop_training = True


class Calls(keras.callbacks.LambdaCallback):
    """Calls `check` after every group of steps and validation batch and at each epoch's
    edges; it stops training by raising (e.g. for a signal whose exception was dropped in a
    finaliser)."""

    def __init__(self, check: Callable[[], None]) -> None:
        def call(*_: Any, **__: Any) -> None:  # (batch or epoch, logs=...)
            check()

        super().__init__(
            on_epoch_begin=call, on_epoch_end=call, on_train_batch_end=call, on_test_batch_end=call
        )


class EpochReport(keras.callbacks.Callback):
    """Hands each epoch's logs, plus its wall time (`epoch_time_s`), to a plain hook.

    Not a `LambdaCallback`: the epoch's start time is state kept between two hooks.
    """

    def __init__(self, hook: EpochHook) -> None:
        super().__init__()
        self.hook = hook
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["epoch_time_s"] = time.perf_counter() - self.started  # also lands in the history
        if self.hook(epoch, {k: float(v) for k, v in logs.items()}):
            self.model.stop_training = True


class EpochLine(keras.callbacks.Callback):
    """One plain line per epoch on stdout, e.g.
    `epoch 3/20: loss 0.2650, accuracy 0.9241, val_loss 0.2419, val_accuracy 0.9326 (2.9 s)`.
    """

    KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        values = ", ".join(f"{key} {float(logs[key]):.4f}" for key in self.KEYS if key in logs)
        print(
            f"epoch {epoch + 1}/{self.epochs}: {values} "
            f"({time.perf_counter() - self.started:.1f} s)",
            flush=True,
        )


def progress(
    verbose: int, epochs: int, stream: Any = None
) -> tuple[int, list[keras.callbacks.Callback]]:
    """What `train.verbose` asks for (0 silent, 1 progress bar, 2 one line per epoch), as the
    verbosity to hand Keras and the callbacks to add: Keras' bar only on a terminal (elsewhere,
    e.g. in `dvc repro` logs, it is a stream of escape codes), else `EpochLine`."""
    stream = sys.stdout if stream is None else stream
    if verbose == 0:
        return 0, []
    if verbose == 1 and stream.isatty():
        return 1, []
    return 0, [EpochLine(epochs)]


class Checkpoint(keras.callbacks.Callback):
    """Saves the model with its optimizer state, then a small JSON saying which epoch.

    Not `keras.callbacks.ModelCheckpoint`: it saves in place (a kill mid-save leaves a torn
    file) and knows nothing of `state.json`, whose config digest decides what may resume.
    """

    def __init__(self, folder: Path, every: int, meta: dict[str, Any]) -> None:
        super().__init__()
        self.folder, self.every, self.meta = folder, every, meta

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / "last.keras", suffix=".keras") as tmp:
            self.model.save(tmp)
        write_json(self.folder / "state.json", {**self.meta, "epoch": epoch + 1})


@dataclass
class Resume:
    model_path: Path
    epoch: int
    meta: dict[str, Any] = field(default_factory=dict)


def find_checkpoint(folder: str | os.PathLike[str], config_digest: str) -> Resume | None:
    """The last checkpoint of an interrupted run with the same config, if there is one."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("config_digest") != config_digest or not (folder / "last.keras").is_file():
        return None
    return Resume(folder / "last.keras", int(meta["epoch"]), meta)


def clear_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Forget the checkpoint of a run that completed."""
    for name in ("state.json", "last.keras"):
        (Path(folder) / name).unlink(missing_ok=True)
