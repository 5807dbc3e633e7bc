"""The epoch loop that trains a compiled model on one device without `Model.fit`'s per-step
machinery around Keras' own train step and callbacks.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from ..config import AugmentationConfig
from ..data.splits import ALIGNMENT, NUM_CLASSES, Split
from .inputs import augmenter


def resident(array: np.ndarray) -> tf.Tensor:
    """The array as a host tensor, without a second copy in memory where it can be shared.

    A 64-byte-aligned array (as `data.splits.load_split` allocates them) is shared through DLPack;
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
    objects. With `shards` > 1 each batch is split into that many shards, each with its own
    forward pass and loss, weighted by its share of the batch: the gradient is the whole
    batch's mean loss's, and the passes are independent until it is summed, so TensorFlow
    runs them side by side (`runtime.resolve_shards` says when that is the same step).
    Validation batches are split the same way. Between calls it runs the callbacks' batch
    hooks (signal checks, NaN stop); at each epoch's end it validates (a call per batch size)
    and runs the epoch hooks, so `History`, learning-rate schedules, early stopping,
    checkpoints and reports see the same logs (`loss`, `accuracy`, `val_loss`,
    `val_accuracy`) as under `fit`. A non-finite loss stops
    the loop at that step; the epoch is then neither validated nor reported.

    Without tf.distribute only: under a strategy, `Model.fit` drives it.
    """

    def __init__(
        self,
        model: keras.Model,
        train: Split,
        val: Split,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: bool | AugmentationConfig,
        steps_per_call: int,
        jit_compile: bool,
        shards: int = 1,
    ) -> None:
        if len(train) == 0 or len(val) == 0:
            raise ValueError(
                "training loop: got an empty train or validation split, "
                "expected at least one image in each"
            )
        if shards > 1 and any(_normalizes_batches(layer) for layer in model.layers):
            raise ValueError(
                f"training loop: got {shards} batch shards for a model with batch "
                "normalization, expected 1 (its statistics over a shard would differ)"
            )
        self.model, self.batch_size, self.shuffle, self.seed = model, batch_size, shuffle, seed
        self.shards = max(1, shards)
        self.steps = math.ceil(len(train) / batch_size)
        # Each call's batches have one static size, so the graph's shape arithmetic folds
        # away (and shards have static sizes): full batches in calls of `steps_per_call`
        # steps, a partial last one on its own.
        self.calls = static_calls(len(train), batch_size, max(1, steps_per_call))
        self.val_batch = max(batch_size, 1000)
        self.val_calls = static_calls(len(val), self.val_batch, per_call=len(val))  # all full
        self.train_x, self.train_y = resident(train.images), resident(train.labels)
        self.val_x, self.val_y = resident(val.images), resident(val.labels)
        self.augment = augmenter(seed, augment) if augment else None
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
            tf.range(n), seed=tf.constant([self.seed, epoch], tf.int64)
        )

    def _forward(self, x: tf.Tensor, y: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """The model's predictions for a batch of static size and the batch's mean loss
        (`model.compute_loss`), computed in `self.shards` independent shards."""
        model = self.model
        sizes = [] if self.shards == 1 else shard_sizes(int(x.shape[0]), self.shards)
        if len(sizes) <= 1:
            predicted = model(x, training=training)
            return predicted, model.compute_loss(x=x, y=y, y_pred=predicted, training=training)
        size = sum(sizes)
        predictions, losses = [], []
        for x_shard, y_shard, n in zip(tf.split(x, sizes), tf.split(y, sizes), sizes, strict=True):
            predicted = model(x_shard, training=training)
            loss = model.compute_loss(x=x_shard, y=y_shard, y_pred=predicted, training=training)
            predictions.append(predicted)
            losses.append(loss * (n / size))
        return tf.concat(predictions, axis=0), tf.add_n(losses)

    def _train_step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        model = self.model
        with tf.GradientTape() as tape:
            predicted, loss = self._forward(x, y, training=True)
            scaled = model.optimizer.scale_loss(loss)
        weights = model.trainable_variables
        model.optimizer.apply(tape.gradient(scaled, weights), weights)
        return loss, predicted

    def _train_steps(
        self,
        images: tf.Tensor,
        labels: tf.Tensor,
        order: tf.Tensor,
        first: tf.Tensor,
        last: tf.Tensor,
        size: int,
    ) -> tuple[tf.Tensor, ...]:
        """Steps `first` to `last` - 1, each on `size` images (a Python int: one trace per
        batch size, with static shapes)."""
        loss_sum, correct, seen = tf.constant(0.0), tf.constant(0, tf.int32), tf.constant(0)
        diverged_at = tf.constant(-1)
        for step in tf.range(first, last):
            with tf.device("/CPU:0"):  # where the arrays are
                start = step * self.batch_size
                index = tf.reshape(order[start : start + size], [size])
                x, y = tf.gather(images, index), tf.gather(labels, index)
            if self.augment is not None:
                x, _ = self.augment(x, y)
                x = tf.ensure_shape(x, [size, *x.shape[1:]])  # shards need the static size
            loss, scores = self._step(x, tf.one_hot(y, NUM_CLASSES, dtype=tf.float32))
            loss_sum += tf.cast(loss, tf.float32) * size
            correct += count_correct(scores, y)
            seen += size
            if not tf.math.is_finite(loss):
                diverged_at = step
                break
        return loss_sum, correct, seen, diverged_at

    def _validation(
        self, images: tf.Tensor, labels: tf.Tensor, first: tf.Tensor, last: tf.Tensor, size: int
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Validation batches `first` to `last` - 1 of `size` images each: their summed loss
        and correct count."""
        loss_sum, correct = tf.constant(0.0), tf.constant(0, tf.int32)
        for batch in tf.range(first, last):
            with tf.device("/CPU:0"):  # where the arrays are
                start = batch * self.val_batch
                x = tf.ensure_shape(images[start : start + size], [size, *images.shape[1:]])
                y = tf.ensure_shape(labels[start : start + size], [size])
            predicted, loss = self._forward(
                x, tf.one_hot(y, NUM_CLASSES, dtype=tf.float32), training=False
            )
            loss_sum += tf.cast(loss, tf.float32) * size
            correct += count_correct(predicted, y)
        return loss_sum, correct

    def validation_scores(self) -> tuple[float, float]:
        """The validation split's mean loss and accuracy."""
        loss_sum, correct = 0.0, 0
        for first, last, size in self.val_calls:
            out = self._validate(
                self.val_x, self.val_y, tf.constant(first), tf.constant(last), size
            )
            loss_sum += float(out[0])
            correct += int(out[1])
        total = int(self.val_y.shape[0])
        return loss_sum / total, correct / total

    def run(
        self,
        callbacks: list[keras.callbacks.Callback],
        *,
        epochs: int,
        initial_epoch: int = 0,
        verbose: int = 0,
    ) -> keras.callbacks.History:
        model = self.model
        hooks = keras.callbacks.CallbackList(
            callbacks,
            add_history=True,
            add_progbar=verbose != 0,
            verbose=verbose,
            epochs=epochs,
            steps=self.steps,
            model=model,
        )
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
                out = self._train(
                    self.train_x, self.train_y, order, tf.constant(first), tf.constant(last), size
                )
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
            # Validation, framed by the test hooks `Model.fit` runs around it.
            hooks.on_test_begin()
            hooks.on_test_batch_begin(0)
            val_loss, val_accuracy = self.validation_scores()
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


def static_calls(count: int, batch_size: int, per_call: int) -> list[tuple[int, int, int]]:
    """(first batch, end batch, batch size) for each compiled call over `count` images: full
    batches, at most `per_call` to a call, then the partial last batch on its own."""
    full, rest = divmod(count, batch_size)
    calls = [(first, min(first + per_call, full), batch_size) for first in range(0, full, per_call)]
    if rest:
        calls.append((full, full + 1, rest))
    return calls


def shard_sizes(size: int, shards: int) -> list[int]:
    """`size` images in at most `shards` shards of near-equal sizes (none empty)."""
    count = max(1, min(shards, size))
    base, extra = divmod(size, count)
    return [base + (1 if index < extra else 0) for index in range(count)]


def _normalizes_batches(layer: keras.layers.Layer) -> bool:
    """Whether `layer`, or a layer inside it, is a batch normalization."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return True
    return any(_normalizes_batches(inner) for inner in getattr(layer, "layers", []))


def count_correct(predicted: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """How many rows of `predicted` put their highest score on the (integer) label."""
    hits = tf.equal(tf.argmax(predicted, axis=-1, output_type=tf.int32), tf.cast(labels, tf.int32))
    return tf.reduce_sum(tf.cast(hits, tf.int32))
