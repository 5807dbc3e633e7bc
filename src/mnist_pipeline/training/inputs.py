"""Batches for `Model.fit` under `tf.distribute`, and the augmentation both loops share."""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from ..config import AugmentationConfig
from ..data.splits import NUM_CLASSES, Split

# Batches assembled ahead of the training step: enough to hide the assembly of one batch.
PREFETCH_BATCHES = 2


def dataset(
    split: Split,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool | AugmentationConfig = False,
) -> tf.data.Dataset:
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
        x, y = tf.numpy_function(
            take, [index], (tf.uint8, tf.uint8), stateful=False, name="take_batch"
        )
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
                tf.range(n, dtype=tf.int64), seed=tf.stack([key, tf.constant(seed, tf.int64)])
            )
            return starts.map(lambda start: order[start : start + batch_size])

        indices = keys.flat_map(epoch)
    else:
        indices = starts.map(lambda start: tf.range(start, tf.minimum(start + batch_size, n)))
    ds = indices.map(assemble).apply(
        tf.data.experimental.assert_cardinality(math.ceil(n / batch_size))
    )
    if augment:
        ds = ds.map(augmenter(seed, augment), num_parallel_calls=tf.data.AUTOTUNE)
    # A fixed prefetch and no tf.data autotuning. With autotuning, the end of an epoch
    # often waited on it (tearing down the epoch's iterator took up to 0.5 s) and epochs
    # came out at 1.27, 2.55 or 5.11 s, i.e. 10 ms x (2^k - 1), the autotuner's doubling
    # wake-up period, whatever their work was.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


# What `augment=True` applies without a config: small shifts, rotations and zooms.
DEFAULT_AUGMENTATION = AugmentationConfig(
    translate=0.1,
    rotate=0.05,
    zoom=0.1,
    shear=0.0,
    noise=0.0,
    blur=0.0,
    contrast=0.0,
    erase=0.0,
    photometric_share=0.5,
)


def augmenter(seed: int, augment: bool | AugmentationConfig = True) -> Callable:
    """A function (uint8 images, labels) -> (augmented uint8 images, labels), drawing new
    random strengths for every image of every batch (seeded). `augment`: the config, or True
    for `DEFAULT_AUGMENTATION`.

    Affine first (Keras' random layers) on every image; then, on a random share
    `photometric_share` of the images, each with its own random strength per image:
    Gaussian blur (a mix of the image with a blurred copy), contrast (the range compressed
    and the background lifted), Gaussian noise, and erasing (one rectangle, of one grey or
    of random pixels, on a share `erase` of them).
    """
    cfg = DEFAULT_AUGMENTATION if augment is True else augment
    if not isinstance(cfg, AugmentationConfig):
        raise ValueError(f"augment: got {augment!r}, expected True or an AugmentationConfig")
    affine: list[keras.layers.Layer] = []
    # float32 whatever the global policy: under mixed_bfloat16 the layers would otherwise
    # hand bfloat16 images to the float32 operations after them.
    common = {"fill_mode": "constant", "dtype": "float32"}
    if cfg.translate:
        affine.append(
            keras.layers.RandomTranslation(cfg.translate, cfg.translate, seed=seed, **common)
        )
    if cfg.rotate:
        affine.append(keras.layers.RandomRotation(cfg.rotate, seed=seed + 1, **common))
    if cfg.zoom:
        affine.append(keras.layers.RandomZoom(cfg.zoom, seed=seed + 2, **common))
    if cfg.shear:
        affine.append(keras.layers.RandomShear(cfg.shear, cfg.shear, seed=seed + 3, **common))
    pipeline = keras.Sequential(affine, name="augment") if affine else None
    generator = keras.random.SeedGenerator(seed + 4)
    blur_kernel = _gaussian_kernel(cfg.blur) if cfg.blur else None

    def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(images, tf.float32)[..., None] / 255.0
        if pipeline is not None:
            x = pipeline(x, training=True)
        shape = (tf.shape(x)[0], 1, 1, 1)
        # The photometric operations change a random share of the images (each with its
        # own strengths) and leave the others as the affine step left them: clean digits
        # stay common in every batch.
        changed = keras.random.uniform(shape, seed=generator) < cfg.photometric_share

        def strength(high: float) -> tf.Tensor:
            """A uniform draw in [0, high) per changed image, 0 for the others."""
            drawn = keras.random.uniform(shape, 0.0, high, seed=generator)
            return tf.where(changed, drawn, 0.0)

        if blur_kernel is not None:
            blurred = tf.nn.conv2d(x, blur_kernel, strides=1, padding="SAME")
            mix = strength(1.0)  # how much of the blurred copy
            x = mix * blurred + (1 - mix) * x
        if cfg.contrast:
            kept = 1 - strength(cfg.contrast)
            lift = keras.random.uniform(tf.shape(kept), 0.0, 1.0, seed=generator)
            x = kept * x + (1 - kept) * lift
        if cfg.noise:
            x = x + strength(cfg.noise) * keras.random.normal(tf.shape(x), seed=generator)
        if cfg.erase:
            x = tf.where(changed, _erase(x, cfg.erase, generator), x)
        return tf.cast(tf.clip_by_value(tf.round(x[..., 0] * 255.0), 0, 255), tf.uint8), labels

    return apply


def _gaussian_kernel(sigma: float) -> tf.Tensor:
    """A (size, size, 1, 1) normalised Gaussian kernel reaching 2 sigma (at least 3x3)."""
    radius = max(1, math.ceil(2 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    line = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel = np.outer(line, line)
    return tf.constant((kernel / kernel.sum())[:, :, None, None], tf.float32)


def _erase(x: tf.Tensor, share: float, generator: keras.random.SeedGenerator) -> tf.Tensor:
    """One rectangle (3 to 14 pixels a side) in a `share` of the images, filled with one
    random grey or, in half of them, with random pixels (both variants of Zhong et al.'s
    Random Erasing): a solid block hides part of the digit, speckles add clutter to it."""
    n, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]

    def draw(low: float, high: float) -> tf.Tensor:
        return keras.random.uniform((n, 1, 1, 1), low, high, seed=generator)

    size_h, size_w = tf.floor(draw(3, 15)), tf.floor(draw(3, 15))
    top = tf.floor(draw(0, 1) * (tf.cast(height, tf.float32) - size_h + 1))
    left = tf.floor(draw(0, 1) * (tf.cast(width, tf.float32) - size_w + 1))
    rows = tf.cast(tf.range(height), tf.float32)[None, :, None, None]
    cols = tf.cast(tf.range(width), tf.float32)[None, None, :, None]
    inside = (
        (rows >= top)
        & (rows < top + size_h)
        & (cols >= left)
        & (cols < left + size_w)
        & (draw(0, 1) < share)
    )
    speckled = draw(0, 1) < 0.5
    fill = tf.where(speckled, keras.random.uniform(tf.shape(x), seed=generator), draw(0, 1))
    return tf.where(inside, fill, x)
