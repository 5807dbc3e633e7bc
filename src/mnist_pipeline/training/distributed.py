"""Training across worker processes with `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3's `Model.fit` cannot train under this strategy (keras-team/keras#20585: "Attempt to
convert a value (PerReplica...) to a Tensor"), so `WorkerLoop` extends the project's own
epoch loop: every worker holds the whole (small) dataset and, at each step, takes its share of
the same seeded global batch; the step is Keras' own train step run by `strategy.run`, whose
optimizer sums the gradients of all workers, so every worker applies the same update and
holds the same weights. Validation runs on every worker on the whole validation split (the
same weights give the same figures, so early stopping and schedules decide alike
everywhere). One step per call: collectives stay out of graph loops.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ..data.splits import NUM_CLASSES, Split
from .loop import EpochLoop, _correct


class WorkerLoop(EpochLoop):
    """`EpochLoop` for one worker of a multi-worker strategy (see the module docstring)."""

    def __init__(self, model: keras.Model, train: Split, val: Split, *, strategy: object,
                 batch_size: int, shuffle: bool, seed: int, augment: bool,
                 jit_compile: bool) -> None:
        with strategy.scope():  # type: ignore[attr-defined]
            super().__init__(model, train, val, batch_size=batch_size, shuffle=shuffle,
                             seed=seed, augment=augment, steps_per_call=1,
                             jit_compile=jit_compile)
        self.strategy = strategy
        resolver = strategy.cluster_resolver  # type: ignore[attr-defined]
        self.workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
        self.worker = int(resolver.task_id or 0)
        n = int(self.train_y.shape[0])
        self.calls = [(step, step + 1, min(batch_size, n - step * batch_size))
                      for step in range(self.steps)]
        self._distributed = tf.function(self._replicated_step, jit_compile=jit_compile)
        self._train = self._worker_step

    def _replicated_step(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, ...]:
        def replica(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, ...]:
            if self.augment is not None:
                x, _ = self.augment(x, y)
            # The plain step: a nested tf.function may not hold the gradients' all-reduce.
            loss, scores = self._train_step(x, tf.one_hot(y, NUM_CLASSES, dtype=tf.float32))
            size = tf.shape(y)[0]
            # Keras scales each worker's mean loss by 1/workers (so that the summed
            # gradients are the global batch's); weighting it back by the share's size
            # makes the sum over workers the global batch's total loss.
            total = tf.cast(loss, tf.float32) * tf.cast(size * self.workers, tf.float32)
            return total, _correct(scores, y), size

        sums = self.strategy.run(replica, args=(x, y))  # type: ignore[attr-defined]
        reduce = self.strategy.reduce  # type: ignore[attr-defined]
        return tuple(reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums)

    def _worker_step(self, images: tf.Tensor, labels: tf.Tensor, order: tf.Tensor,
                     first: tf.Tensor, last: tf.Tensor, size: int) -> tuple[tf.Tensor, ...]:
        """One global step (the `calls` entry `first`), this worker's share of its batch."""
        start = int(first) * self.batch_size
        with tf.device("/CPU:0"):  # where the arrays are
            mine = order[start + self.worker:start + size:self.workers]
            x, y = tf.gather(images, mine), tf.gather(labels, mine)
        loss_sum, correct, seen = self._distributed(x, y)
        diverged_at = tf.constant(-1 if bool(tf.math.is_finite(loss_sum)) else int(first))
        return loss_sum, correct, seen, diverged_at
