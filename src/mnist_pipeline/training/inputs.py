"""Batches for `Model.fit` under `tf.distribute`, and the augmentation both loops share.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from ..data.splits import NUM_CLASSES, Split

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
