"""Small synthetic data in MNIST's format, and where the project lives."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` uint8 28x28 images whose class is learnable: a bright bar at a class-specific row."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 3 + 2 * int(label)
        images[i, row : row + 2, 4:24] = 255
    return images, labels


def graded_model(broken: tuple[int, ...]):
    """A linear model that reads each synthetic digit's bar, except that it sends the classes
    in `broken` to the next class: exactly their images are wrong (accuracy 1 - k/10)."""
    import keras

    weights = np.zeros((28 * 28, 10), np.float32)
    for cls in range(10):
        mask = np.zeros((28, 28), np.float32)
        row = 3 + 2 * cls
        mask[row : row + 2, 4:24] = 10.0 / 40  # ~10 for the class's own bar, ~1 for noise
        target = (cls + 1) % 10 if cls in broken else cls
        weights[:, target] += mask.ravel()
    # float32 whatever global policy an earlier test in this process left (training sets
    # mixed_bfloat16 process-wide on CPUs where it is faster), as the train stage saves models
    # (and as the ONNX export insists).
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        model = keras.Sequential(
            [
                keras.Input((28, 28), dtype="uint8", name="image"),
                keras.layers.Rescaling(1.0 / 255),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax", name="probabilities"),
            ]
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.layers[-1].set_weights([weights, np.zeros(10, np.float32)])
    return model
