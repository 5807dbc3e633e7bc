"""Training across worker processes with `tf.distribute.MultiWorkerMirroredStrategy`.

Keras 3's `Model.fit` cannot train under this strategy (keras-team/keras#20585: "Attempt to
convert a value (PerReplica...) to a Tensor"), so `WorkerLoop` extends the project's own
epoch loop: every worker holds the whole (small) dataset and, at each step, takes its share of
the same seeded global batch; the step is Keras' own train step run by `strategy.run`, whose
optimizer sums the gradients of all workers, so every worker applies the same update and
holds the same weights. Validation runs on every worker on the whole validation split (the
same weights give the same figures, so early stopping and schedules decide alike
everywhere). One step per call: collectives stay out of graph loops.

A worker that dies breaks its peers' all-reduce within seconds. One that hangs (a stopped
process, a host that went silent) would leave them waiting in it for ever, and a thread
blocked inside TensorFlow takes no Python exception: a watchdog thread ends the process
(one line on stderr, exit status `STALLED`) when no step has completed for
`runtime.collective_timeout_s` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import keras
import tensorflow as tf

from ..config import AugmentationConfig
from ..data.splits import NUM_CLASSES, Split
from ..errors import TrainingError
from .loop import EpochLoop, count_correct

STALLED = 75  # the exit status of a worker whose step stalled (EX_TEMPFAIL)


class Watchdog:
    """Ends the process when `beat` has not been called for `timeout_s` seconds."""

    def __init__(self, timeout_s: float, what: str) -> None:
        self.timeout_s, self.what = timeout_s, what
        self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self.last > self.timeout_s:
                print(
                    f"train: error: {self.what}: no step completed in {self.timeout_s:g} s "
                    "(runtime.collective_timeout_s); another worker is stuck or gone",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(STALLED)


class WorkerLoop(EpochLoop):
    """`EpochLoop` for one worker of a multi-worker strategy (see the module docstring)."""

    def __init__(
        self,
        model: keras.Model,
        train: Split,
        val: Split,
        *,
        strategy: object,
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: bool | AugmentationConfig,
        jit_compile: bool,
        stall_timeout_s: float,
    ) -> None:
        with strategy.scope():  # type: ignore[attr-defined]
            super().__init__(
                model,
                train,
                val,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=seed,
                augment=augment,
                steps_per_call=1,
                jit_compile=jit_compile,
            )
        self.strategy = strategy
        resolver = strategy.cluster_resolver  # type: ignore[attr-defined]
        self.workers = max(1, len(resolver.cluster_spec().as_dict().get("worker", [])))
        self.worker = int(resolver.task_id or 0)
        n = int(self.train_y.shape[0])
        self.calls = [
            (step, step + 1, min(batch_size, n - step * batch_size)) for step in range(self.steps)
        ]
        self._distributed = tf.function(self._replicated_step, jit_compile=jit_compile)
        self._train = self._worker_step
        self.watchdog = Watchdog(stall_timeout_s, f"worker {self.worker} of {self.workers}")

    def run(
        self,
        callbacks: list[keras.callbacks.Callback],
        *,
        epochs: int,
        initial_epoch: int = 0,
        verbose: int = 0,
    ) -> keras.callbacks.History:
        with self.watchdog:
            return super().run(
                callbacks, epochs=epochs, initial_epoch=initial_epoch, verbose=verbose
            )

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
            return total, count_correct(scores, y), size

        sums = self.strategy.run(replica, args=(x, y))  # type: ignore[attr-defined]
        reduce = self.strategy.reduce  # type: ignore[attr-defined]
        return tuple(reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums)

    def _worker_step(
        self,
        images: tf.Tensor,
        labels: tf.Tensor,
        order: tf.Tensor,
        first: tf.Tensor,
        last: tf.Tensor,
        size: int,
    ) -> tuple[tf.Tensor, ...]:
        """One global step (the `calls` entry `first`), this worker's share of its batch."""
        start = int(first) * self.batch_size
        with tf.device("/CPU:0"):  # where the arrays are
            mine = order[start + self.worker : start + size : self.workers]
            x, y = tf.gather(images, mine), tf.gather(labels, mine)
        try:
            loss_sum, correct, seen = self._distributed(x, y)
        except tf.errors.OpError as err:
            # A peer that dies mid-step fails the all-reduce with one of several error
            # classes (Unavailable, Cancelled, Aborted, Internal, Unknown, ...), depending on
            # where its collective was: each gets the same one line, with the class named.
            reason = _cause(str(err.message))
            raise TrainingError(
                f"worker {self.worker} of {self.workers}: the step's "
                f"all-reduce with the other workers failed ({type(err).__name__}: {reason}); "
                "another worker stopped"
            ) from None
        self.watchdog.beat()
        diverged_at = tf.constant(-1 if bool(tf.math.is_finite(loss_sum)) else int(first))
        return loss_sum, correct, seen, diverged_at


def _cause(message: str) -> str:
    """The telling line of a collective op's error (TensorFlow's messages start with where
    the op was defined and end with its node name)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [
        line
        for line in lines
        if not line.startswith(("File ", "Detected at node", "[[", "Graph execution error"))
        and not line.endswith(":")
    ]
    return (telling[0] if telling else lines[-1] if lines else "no detail")[:200]
