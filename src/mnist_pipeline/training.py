"""How a Keras model is trained: runtime set-up, the training loop, callbacks and `fit`.

`configure_runtime` must run before TensorFlow builds anything (it sets the precision
policy, threads, determinism and logical devices). `fit` builds, compiles and trains the
model and reports each epoch to a plain Python hook, so this module knows nothing about
MLflow. It trains with `EpochLoop`: Keras' own train step (forward pass, compiled loss,
loss scaling, optimizer) and Keras callbacks, with none of the per-step machinery of
`Model.fit` around it; under a configured `tf.distribute` strategy it uses `Model.fit`.

How it runs fast without changing the maths: bfloat16 compute with float32 weights where
the hardware has it, many steps per compiled call, batches gathered inside the graph from
the arrays' own memory, XLA on GPUs only. benchmarks/ measures each of these.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import models
from .config import ModelConfig, OptimizerConfig, RuntimeConfig, TrainConfig
from .data import ALIGNMENT, NUM_CLASSES, Split
from .errors import TrainingError
from .files import atomic_path, write_json

# Called after each epoch with its logs; returning True stops training after that epoch.
EpochHook = Callable[[int, dict[str, float]], bool | None]


@dataclass
class Runtime:
    """What `configure_runtime` decided, for logging and for `fit`."""

    precision: str
    jit_compile: bool
    device: str
    strategy: Any
    replicas: int
    deterministic: bool

    def describe(self) -> dict[str, Any]:
        return {"runtime.resolved_precision": self.precision,
                "runtime.resolved_jit_compile": self.jit_compile,
                "runtime.device": self.device, "runtime.replicas": self.replicas}


# --- runtime -------------------------------------------------------------------------------

def cpu_supports_bf16() -> bool:
    """True where the CPU has native bfloat16 matmuls (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_precision() -> str | None:
    """mixed_bfloat16 on Ampere or newer, mixed_float16 on Volta/Turing, None without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
    if capability and capability >= (8, 0):
        return "mixed_bfloat16"
    if capability and capability >= (7, 0):
        return "mixed_float16"
    return "float32"


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    on_gpu = gpu_precision()
    if on_gpu is not None:
        return on_gpu
    return "mixed_bfloat16" if cpu_supports_bf16() else "float32"


# Threads, logical devices and the other process-wide settings apply only before
# TensorFlow's runtime starts, so only the first configuration in a process applies them
# (sweep workers train many trials).
_devices_configured = False


def _configure_devices(cfg: RuntimeConfig) -> None:
    global _devices_configured
    if _devices_configured:
        return
    _devices_configured = True
    # The ~600k objects importing TensorFlow and Keras created live as long as the process;
    # every full garbage collection walked them all (~0.3 s each, during the run and twice
    # at exit). Frozen, they are skipped: a training process ends 2-4 s sooner. Objects made
    # from here on are collected as usual.
    gc.freeze()
    if cfg.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.intra_op_threads)
    if cfg.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.logical_devices > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.logical_devices)
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)


def configure_runtime(cfg: RuntimeConfig, seed: int) -> Runtime:
    """Apply the runtime config. Device settings take effect on the first call in a process."""
    _configure_devices(cfg)
    gpus = tf.config.list_physical_devices("GPU")

    keras.utils.set_random_seed(seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()

    precision = resolve_precision(cfg.precision)
    keras.mixed_precision.set_global_policy(precision)

    jit = str(cfg.jit_compile).lower()
    # XLA fuses the small ops around each matmul: a clear win on GPUs. On CPUs it measured
    # ~20% slower per epoch (its matmuls are slower than the oneDNN bfloat16 kernels the
    # graph executor runs) and its compilation costs seconds and ~100 MB: GPUs only.
    jit_compile = jit == "true" or (jit == "auto" and bool(gpus) and not cfg.deterministic)

    if cfg.distribute == "mirrored":
        devices = None
        if not gpus and cfg.logical_devices > 1:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif cfg.distribute == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    if cfg.distribute != "default":
        jit_compile = jit == "true"  # XLA across replicas only when asked for explicitly
    device = f"GPU x{len(gpus)}" if gpus else f"CPU ({os.cpu_count()} cores)"
    return Runtime(precision=precision, jit_compile=jit_compile, device=device,
                   strategy=strategy, replicas=strategy.num_replicas_in_sync,
                   deterministic=cfg.deterministic)


# --- input pipeline ------------------------------------------------------------------------

# Batches assembled ahead of the training step: enough to hide the assembly of one batch.
PREFETCH_BATCHES = 2


def dataset(split: Split, *, batch_size: int, shuffle: bool = False, seed: int = 0,
            augment: bool = False) -> tf.data.Dataset:
    """Batches of (uint8 images, one-hot float32 labels), one batch at a time.

    Nothing runs per image. A shuffled epoch is one seeded permutation of the indices (one
    op, a new permutation each time the dataset is iterated, i.e. each epoch, the same ones
    in every run with the same seeds); a batch is a slice of it, gathered from the arrays in
    one NumPy indexing call. Unshuffled batches are consecutive. Every image appears once
    per epoch and the last batch may be partial, as with `from_tensor_slices(...)
    .shuffle(n, seed, reshuffle_each_iteration=True).batch(...)`, which instead copies each
    image through a shuffle buffer every epoch (tens of thousands of tiny tensors, on the
    same cores that train).

    The batches are cut from the split's own arrays, not from a copy made into TensorFlow:
    that copy would hold every image twice for the whole run.
    """
    n = len(split)
    if n == 0:
        raise ValueError("dataset: got an empty split, expected at least one image")
    images, labels = split.images, split.labels

    def take(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images[index], labels[index]

    def assemble(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(take, [index], (tf.uint8, tf.uint8), stateful=False,
                                 name="take_batch")
        x = tf.ensure_shape(x, (None, *images.shape[1:]))
        y = tf.one_hot(tf.ensure_shape(y, (None,)), NUM_CLASSES, dtype=tf.float32)
        return x, y

    starts = tf.data.Dataset.range(0, n, batch_size)
    if shuffle:
        # One int64 per iteration, different every epoch and fixed by `seed` (and by the
        # global seed `configure_runtime` sets): the key of that epoch's permutation.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)

        def epoch(key: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([key, tf.constant(seed, tf.int64)]))
            return starts.map(lambda start: order[start:start + batch_size])

        indices = keys.flat_map(epoch)
    else:
        indices = starts.map(lambda start: tf.range(start, tf.minimum(start + batch_size, n)))
    ds = indices.map(assemble).apply(
        tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
    if augment:
        ds = ds.map(_augmenter(seed), num_parallel_calls=tf.data.AUTOTUNE)
    # A fixed prefetch and no tf.data autotuning. With autotuning, the end of an epoch
    # often waited on it (tearing down the epoch's iterator took up to 0.5 s) and epochs
    # came out at 1.27, 2.55 or 5.11 s, i.e. 10 ms x (2^k - 1), the autotuner's doubling
    # wake-up period, whatever their work was.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def _augmenter(seed: int) -> Callable:
    """Small random shifts, rotations and zooms; images stay uint8."""
    pipeline = keras.Sequential([
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed),
        keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
    ], name="augment")

    def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(images, tf.float32)[..., None]
        x = pipeline(x, training=True)[..., 0]
        return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8), labels

    return apply


# --- callbacks -----------------------------------------------------------------------------

def schedule_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for `epoch` (0-based) under `train.lr_schedule`."""
    sched = cfg.lr_schedule
    if sched.warmup_epochs and epoch < sched.warmup_epochs:
        return (epoch + 1) / (sched.warmup_epochs + 1)
    if sched.name == "cosine":
        span = max(cfg.epochs - sched.warmup_epochs, 1)
        progress = (epoch - sched.warmup_epochs) / span
        return sched.min_factor + (1 - sched.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if sched.name == "step":
        return sched.factor ** ((epoch - sched.warmup_epochs) // sched.step_epochs)
    return 1.0


class LearningRate(keras.callbacks.Callback):
    """Sets the epoch's learning rate from the schedule and records it in the logs."""

    def __init__(self, cfg: TrainConfig, base_lr: float) -> None:
        super().__init__()
        self.cfg, self.base_lr = cfg, base_lr

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.cfg.lr_schedule.name != "plateau" or epoch < self.cfg.lr_schedule.warmup_epochs:
            self.model.optimizer.learning_rate.assign(self.base_lr * schedule_factor(self.cfg, epoch))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                self.model.optimizer.learning_rate))


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss and remembers where it happened."""

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


class Calls(keras.callbacks.Callback):
    """Calls `check` after every group of steps and at each epoch's edges; it stops training
    by raising (e.g. for a signal whose exception was dropped in a finaliser)."""

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check = check

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.check()

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.check()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.check()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.check()


class EpochReport(keras.callbacks.Callback):
    """Hands each epoch's logs, plus its wall time (`epoch_time_s`), to a plain hook."""

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


class Checkpoint(keras.callbacks.Callback):
    """Saves the model with its optimizer state, then a small JSON saying which epoch."""

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


# --- the training loop ---------------------------------------------------------------------

def resident(array: np.ndarray) -> tf.Tensor:
    """The array as a host tensor, without a second copy in memory where it can be shared.

    A 64-byte-aligned array (as `data.load_split` allocates them) is shared through DLPack;
    TensorFlow would otherwise copy it (+43 MB for the training images, held for the whole
    run). Unaligned or read-only arrays are copied. The arrays stay in host memory even with
    a GPU: batches are gathered there (TensorFlow has no GPU gather for uint8) and only each
    batch moves to the device.
    """
    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    with tf.device("/CPU:0"):
        return tf.convert_to_tensor(array)


class EpochLoop:
    """Trains a compiled model epoch by epoch, driving the same Keras callbacks as `fit`.

    Each call of one compiled function runs `steps_per_call` training steps in a graph loop
    (the partial last batch, if any, in a call of its own, so that every traced step has a
    static batch size and TensorFlow folds its shape arithmetic away at graph optimisation):
    the batch is gathered in-graph from the arrays held as tensors (a seeded permutation per
    epoch, as `dataset` does, with no tf.data pipeline or Python call per batch), then the
    same forward pass, loss (`model.compute_loss`), loss scaling and optimizer update as
    Keras' `train_step`. Loss and accuracy are summed in the loop rather than kept in metric
    objects. Between calls it runs the callbacks' batch hooks (signal checks, NaN stop); at
    each epoch's end it validates in one call and runs the epoch hooks, so `History`,
    learning-rate schedules, early stopping, checkpoints and reports see the same logs
    (`loss`, `accuracy`, `val_loss`, `val_accuracy`) as under `fit`. A non-finite loss stops
    the loop at that step; the epoch is then neither validated nor reported.

    Without tf.distribute only: under a strategy, `Model.fit` drives it.
    """

    def __init__(self, model: keras.Model, train: Split, val: Split, *, batch_size: int,
                 shuffle: bool, seed: int, augment: bool, steps_per_call: int,
                 jit_compile: bool) -> None:
        if len(train) == 0 or len(val) == 0:
            raise ValueError("training loop: got an empty train or validation split, "
                             "expected at least one image in each")
        self.model, self.batch_size, self.shuffle, self.seed = model, batch_size, shuffle, seed
        self.steps = math.ceil(len(train) / batch_size)
        # Each call's batches have one static size, so the graph's shape arithmetic folds
        # away: full batches in calls of `steps_per_call` steps, a partial last one on its own.
        full, rest = divmod(len(train), batch_size)
        per_call = max(1, steps_per_call)
        self.calls = [(first, min(first + per_call, full), batch_size)
                      for first in range(0, full, per_call)]
        if rest:
            self.calls.append((full, full + 1, rest))
        self.val_batch = max(batch_size, 1000)
        self.train_x, self.train_y = resident(train.images), resident(train.labels)
        self.val_x, self.val_y = resident(val.images), resident(val.labels)
        self.augment = _augmenter(seed) if augment else None
        optimizer = model.optimizer
        if not optimizer.built:  # variables must exist before tracing
            optimizer.build(model.trainable_variables)
        # As in Keras: one step compiled with XLA where asked, the loop around it not.
        self._step = tf.function(self._train_step, jit_compile=jit_compile)
        self._train = tf.function(self._train_steps)
        self._validate = tf.function(self._validation)

    def __enter__(self) -> EpochLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the data and the compiled functions now, not at the next full garbage
        collection (the functions hold this object in a reference cycle): a process that
        trains many models (a sweep worker) would otherwise keep each one's images."""
        self.train_x = self.train_y = self.val_x = self.val_y = None
        self._step = self._train = self._validate = None

    def order(self, epoch: int) -> tf.Tensor:
        """The epoch's permutation of the training images: fixed by (seed, epoch)."""
        n = int(self.train_y.shape[0])
        if not self.shuffle:
            return tf.range(n)
        return tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.constant([self.seed, epoch], tf.int64))

    def _train_step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        model = self.model
        with tf.GradientTape() as tape:
            predicted = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=predicted, training=True)
            scaled = model.optimizer.scale_loss(loss)
        weights = model.trainable_variables
        model.optimizer.apply(tape.gradient(scaled, weights), weights)
        return loss, _scores(predicted)

    def _train_steps(self, images: tf.Tensor, labels: tf.Tensor, order: tf.Tensor,
                     first: tf.Tensor, last: tf.Tensor, size: int) -> tuple[tf.Tensor, ...]:
        """Steps `first` to `last` - 1, each on `size` images (a Python int: one trace per
        batch size, with static shapes)."""
        loss_sum, correct, seen = tf.constant(0.0), tf.constant(0, tf.int32), tf.constant(0)
        diverged_at = tf.constant(-1)
        for step in tf.range(first, last):
            with tf.device("/CPU:0"):  # where the arrays are
                start = step * self.batch_size
                index = tf.reshape(order[start:start + size], [size])
                x, y = tf.gather(images, index), tf.gather(labels, index)
            if self.augment is not None:
                x, _ = self.augment(x, y)
            loss, scores = self._step(x, tf.one_hot(y, NUM_CLASSES, dtype=tf.float32))
            loss_sum += tf.cast(loss, tf.float32) * size
            correct += _correct(scores, y)
            seen += size
            if not tf.math.is_finite(loss):
                diverged_at = step
                break
        return loss_sum, correct, seen, diverged_at

    def _validation(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        n = tf.shape(labels)[0]
        loss_sum, correct = tf.constant(0.0), tf.constant(0, tf.int32)
        for start in tf.range(0, n, self.val_batch):
            with tf.device("/CPU:0"):  # where the arrays are
                x = images[start:start + self.val_batch]
                y = labels[start:start + self.val_batch]
            predicted = self.model(x, training=False)
            loss = self.model.compute_loss(x=x, y=tf.one_hot(y, NUM_CLASSES, dtype=tf.float32),
                                           y_pred=predicted, training=False)
            loss_sum += tf.cast(loss, tf.float32) * tf.cast(tf.shape(y)[0], tf.float32)
            correct += _correct(predicted, y)
        total = tf.cast(n, tf.float32)
        return loss_sum / total, tf.cast(correct, tf.float32) / total

    def run(self, callbacks: list[keras.callbacks.Callback], *, epochs: int,
            initial_epoch: int = 0, verbose: int = 0) -> keras.callbacks.History:
        model = self.model
        hooks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
            epochs=epochs, steps=self.steps, model=model)
        model.stop_training = False
        hooks.on_train_begin()
        logs: dict[str, float] | None = None
        for epoch in range(initial_epoch, epochs):
            hooks.on_epoch_begin(epoch)
            order = self.order(epoch)
            loss_sum, correct, seen = 0.0, 0, 0
            diverged = False
            for first, last, size in self.calls:
                hooks.on_train_batch_begin(first)
                out = self._train(self.train_x, self.train_y, order,
                                  tf.constant(first), tf.constant(last), size)
                loss_sum += float(out[0])
                correct += int(out[1])
                seen += int(out[2])
                diverged_at = int(out[3])
                diverged = diverged_at >= 0
                batch_logs = {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)}
                hooks.on_train_batch_end(diverged_at if diverged else last - 1, batch_logs)
                if model.stop_training or diverged:
                    break
            if diverged:
                break
            # Validation in one call, framed by the test hooks `Model.fit` runs around it.
            hooks.on_test_begin()
            hooks.on_test_batch_begin(0)
            val_loss, val_accuracy = (float(v) for v in self._validate(self.val_x, self.val_y))
            val_logs = {"loss": val_loss, "accuracy": val_accuracy}
            hooks.on_test_batch_end(0, val_logs)
            hooks.on_test_end(val_logs)
            logs = {**batch_logs, "val_loss": val_loss, "val_accuracy": val_accuracy}
            hooks.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        if epochs > 0:
            model.optimizer.finalize_variable_values(model.trainable_weights)
        hooks.on_train_end(logs=logs)
        return model.history


def _scores(predicted: tf.Tensor) -> tf.Tensor:
    """What to take the argmax of: a softmax's input where Keras kept it (`_keras_logits`,
    which its losses compute from), else `predicted`. Same argmax, and then no training step
    computes the softmax itself, which nothing else there needs. Only in the function that
    called the model: the attribute does not cross a function's boundary."""
    return getattr(predicted, "_keras_logits", predicted)


def _correct(predicted: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """How many rows of `predicted` put their highest score on the (integer) label."""
    hits = tf.equal(tf.argmax(_scores(predicted), axis=-1, output_type=tf.int32),
                    tf.cast(labels, tf.int32))
    return tf.reduce_sum(tf.cast(hits, tf.int32))


# --- fit -----------------------------------------------------------------------------------

@dataclass
class Result:
    model: keras.Model
    history: dict[str, list[float]]
    epochs_run: int
    initial_epoch: int


def fit(model_cfg: ModelConfig, optimizer_cfg: OptimizerConfig, cfg: TrainConfig,
        runtime: Runtime, train: Split, val: Split, *, steps_per_execution: int,
        on_epoch_end: EpochHook | None = None, checkpoint_dir: Path | None = None,
        checkpoint_meta: dict[str, Any] | None = None, resume: Resume | None = None,
        extra_callbacks: list[keras.callbacks.Callback] | None = None) -> Result:
    """Build, compile and train the configured model; raise `TrainingError` on divergence."""
    global_batch = cfg.batch_size
    with runtime.strategy.scope():
        if resume is not None:
            # The checkpoint carries the weights and the optimizer's state (moments, step).
            model = keras.saving.load_model(resume.model_path, safe_mode=True)
            optimizer, initial_epoch = model.optimizer, resume.epoch
        else:
            model = models.build(model_cfg)
            optimizer, initial_epoch = models.build_optimizer(optimizer_cfg), 0
        models.compile_model(model, optimizer, cfg.loss, steps_per_execution=steps_per_execution,
                             jit_compile=runtime.jit_compile)

    nan_guard = StopOnNaN()
    callbacks: list[keras.callbacks.Callback] = [
        LearningRate(cfg, optimizer_cfg.learning_rate), nan_guard]
    if cfg.lr_schedule.name == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=cfg.lr_schedule.factor, patience=cfg.lr_schedule.patience))
    if cfg.early_stopping.enabled:
        es = cfg.early_stopping
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=es.monitor, patience=es.patience, min_delta=es.min_delta,
            restore_best_weights=es.restore_best_weights))
    callbacks.extend(extra_callbacks or [])
    if on_epoch_end is not None:
        callbacks.append(EpochReport(on_epoch_end))
    if checkpoint_dir is not None and cfg.checkpoint.enabled:
        # After the report: a checkpoint never gets ahead of the epochs the run has logged.
        callbacks.append(Checkpoint(checkpoint_dir, cfg.checkpoint.every_epochs,
                                    dict(checkpoint_meta or {})))

    if runtime.strategy is tf.distribute.get_strategy():  # the default: no tf.distribute
        # model.jit_compile: what compile() kept of the request (Keras turns XLA off under op
        # determinism and for layers that do not support it).
        with EpochLoop(model, train, val, batch_size=global_batch, shuffle=cfg.shuffle,
                       seed=cfg.seed, augment=cfg.augment, steps_per_call=steps_per_execution,
                       jit_compile=bool(model.jit_compile)) as loop:
            history = loop.run(callbacks, epochs=cfg.epochs, initial_epoch=initial_epoch,
                               verbose=cfg.verbose)
    else:
        # Under a tf.distribute strategy (even with one replica), Keras' own loop feeds it.
        train_ds = dataset(train, batch_size=global_batch, shuffle=cfg.shuffle, seed=cfg.seed,
                           augment=cfg.augment)
        val_ds = dataset(val, batch_size=max(global_batch, 1000))
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks,
                            verbose=cfg.verbose, shuffle=False)  # the dataset shuffles, seeded
    if nan_guard.diverged_at is not None:
        epoch, batch = nan_guard.diverged_at
        raise TrainingError(
            f"loss became NaN/inf at epoch {epoch + 1} (batch {batch + 1}); training stopped. "
            "Lower optimizer.learning_rate or check the data")
    values = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    return Result(model=model, history=values, epochs_run=len(values.get("loss", [])),
                  initial_epoch=initial_epoch)


def clear_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Forget the checkpoint of a run that completed."""
    for name in ("state.json", "last.keras"):
        (Path(folder) / name).unlink(missing_ok=True)


def predict(model: keras.Model, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities (N, 10) float32 for raw uint8 images."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)


def weights_digest(model: keras.Model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()
