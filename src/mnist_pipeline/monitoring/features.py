"""What the monitor compares: a few numbers per input image and per answer.

Drift tests do not compare raw pixels (784 dimensions, and nothing a person can read in an
alarm); they compare seven statistics of each image that the common ways MNIST traffic goes
wrong move: a brighter or noisier background (`mean`, `contrast`), thicker or thinner
strokes (`ink`), digits drawn larger or smaller (`height`, `width`), off-centre digits
(`row_centre`, `col_centre`). The answers are summarised by the predicted class, the
calibrated confidence and the entropy of the probabilities.

Vectorised over the batch: one request (N=1) costs microseconds, a whole test set a few
milliseconds, so the server can log these for every request.
"""

from __future__ import annotations

import numpy as np

SIDE = 28  # MNIST images are 28x28 pixels
AREA = SIDE * SIDE
CHUNK = 2048  # images per step of the vectorised computation
STROKE = 128  # a pixel at or above this (of 255) is part of the pen stroke
# The centre of a 0..27 grid: the centre of mass of a blank image, which has no mass.
BLANK_CENTRE = (SIDE - 1) / 2
# The smallest positive float32: a probability that underflowed to 0 still has a log.
TINY = float(np.finfo(np.float32).tiny)

INPUT_STATISTICS: tuple[str, ...] = (
    "ink",
    "mean",
    "contrast",
    "height",
    "width",
    "row_centre",
    "col_centre",
)
OUTPUT_STATISTICS: tuple[str, ...] = ("predicted", "confidence", "entropy")

_FROM_MIDDLE = np.arange(SIDE, dtype=np.float64) - BLANK_CENTRE  # pixel coordinates


def input_statistics(images: np.ndarray) -> np.ndarray:
    """(N, 7) float32 statistics of uint8 (N, 28, 28) images, columns as `INPUT_STATISTICS`.

    ink                  fraction of the 784 pixels that are stroke (>= 128)
    mean, contrast       mean and standard deviation of the pixel values, divided by 255
    height, width        rows and columns spanned by the stroke pixels' bounding box (0: none)
    row_centre,          intensity-weighted centre of mass in 0..27 pixel coordinates
    col_centre           (13.5, the middle, for an all-black image)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(
            f"images: got shape {images.shape} dtype {images.dtype}, expected "
            f"shape (N, {SIDE}, {SIDE}) dtype uint8 (raw MNIST pixels)"
        )
    out = np.empty((images.shape[0], len(INPUT_STATISTICS)), dtype=np.float32)
    # In chunks, so the float32 copy stays in cache-sized pieces: a whole 100,000-image
    # batch at once is five times slower per image (and 300 MB more memory).
    for start in range(0, images.shape[0], CHUNK):
        _fill(images[start : start + CHUNK], out[start : start + CHUNK])
    return out


def _fill(images: np.ndarray, out: np.ndarray) -> None:
    """Write the statistics of uint8 (n, 28, 28) `images` into `out` (n, 7)."""
    n = images.shape[0]
    # Row and column sums in float32 are exact: integers below 2**24 (a row of 28 pixels
    # sums to at most 28 * 255**2); per-image totals are then taken in float64. einsum is
    # several times faster here than `sum(axis=...)` or `std`, and writing rows and columns
    # into one buffer lets each later step run once for both (which is what keeps N=1 cheap).
    pixels = images.astype(np.float32)
    mass = np.empty((n, 2, SIDE), dtype=np.float32)  # [:, 0] per row, [:, 1] per column
    np.einsum("nij->ni", pixels, out=mass[:, 0])
    np.einsum("nij->nj", pixels, out=mass[:, 1])
    total = mass[:, 0].sum(axis=1, dtype=np.float64)
    squares = np.einsum("nij,nij->ni", pixels, pixels).sum(axis=1, dtype=np.float64)
    mean = total / AREA
    out[:, 1] = mean / 255
    out[:, 2] = np.sqrt(np.maximum(squares / AREA - mean * mean, 0.0)) / 255

    stroke = (images >= STROKE).view(np.uint8)
    strokes = np.empty((n, 2, SIDE), dtype=np.uint8)  # stroke pixels per row / column (<= 28)
    np.einsum("nij->ni", stroke, out=strokes[:, 0])
    np.einsum("nij->nj", stroke, out=strokes[:, 1])
    out[:, 0] = strokes[:, 0].sum(axis=1, dtype=np.int64) / AREA
    out[:, 3:5] = _extent(strokes > 0)

    # Measured from the middle, a blank image (no mass, total 0) lands exactly on it; every
    # other image has total >= 1, so the `maximum` changes nothing for it.
    out[:, 5:7] = BLANK_CENTRE + (mass @ _FROM_MIDDLE) / np.maximum(total, 1.0)[:, None]


def _extent(occupied: np.ndarray) -> np.ndarray:
    """Along the last axis of a bool array: last True index - first True index + 1 (0: none)."""
    first = occupied.argmax(axis=-1)
    last = occupied.shape[-1] - 1 - occupied[..., ::-1].argmax(axis=-1)
    return np.where(occupied.any(axis=-1), last - first + 1, 0)


def output_statistics(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted, confidence, entropy) for (N, classes) calibrated probabilities.

    predicted is the argmax (int64), confidence the largest probability (float32), entropy
    -sum p ln p in nats (float32; a probability of 0 adds 0), from 0 for a one-hot answer to
    ln(classes) for a uniform one.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(
            f"probabilities: got shape {probabilities.shape}, expected "
            "(N, classes) with at least 2 classes"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError(
            "probabilities: got NaN or infinite values, expected finite "
            "probabilities (softmax outputs)"
        )
    predicted = probabilities.argmax(axis=1).astype(np.int64)
    confidence = probabilities.max(axis=1).astype(np.float32)
    log_p = np.log(np.clip(probabilities, TINY, None))
    entropy = np.maximum(-(probabilities * log_p).sum(axis=1), 0.0).astype(np.float32)
    return predicted, confidence, entropy
