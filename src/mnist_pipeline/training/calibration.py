"""Calibrated confidence: temperature scaling and an abstention threshold, both fitted on the
validation split after training, and the measures they are judged by (NLL, Brier, ECE).

A model's softmax output p is rescaled as softmax(log p / T): the same as dividing its logits
by T, since log p differs from the logits by one constant per image. T > 1 softens an
overconfident model, T < 1 sharpens an underconfident one (label smoothing makes models
underconfident); the predicted class never changes. T is the one value that minimises the
negative log-likelihood of the validation labels (Guo et al. 2017). The threshold is the
lowest calibrated confidence at which the answered validation images reach the target
selective accuracy; answers below it are marked "unsure". Neither ever sees the test set.

Plain NumPy and SciPy on arrays: evaluate scores with the same functions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as uncertainty-baselines report ECE
# Keras' backend epsilon: probabilities are clipped to [EPSILON, 1 - EPSILON] before the
# log, as `keras.losses.categorical_crossentropy` does, so NLL on raw outputs is Keras' loss.
EPSILON = 1e-7
# The smallest positive float32: a probability that underflowed to 0 still has a log.
TINY = float(np.finfo(np.float32).tiny)
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Calibration:
    """What travels with a model version: how to rescale its outputs and when to abstain."""

    temperature: float
    threshold: float  # answers with calibrated confidence below it are "unsure"
    target_selective_accuracy: float
    val_images: int
    val_sha256: str
    val_nll_before: float
    val_nll_after: float
    val_ece_before: float
    val_ece_after: float
    val_coverage: float  # answered share of the validation images at `threshold`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Calibration:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in names})


IDENTITY = Calibration(
    temperature=1.0,
    threshold=0.0,
    target_selective_accuracy=math.nan,
    val_images=0,
    val_sha256="",
    val_nll_before=math.nan,
    val_nll_after=math.nan,
    val_ece_before=math.nan,
    val_ece_after=math.nan,
    val_coverage=math.nan,
)


# --- rescaling -----------------------------------------------------------------------------


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) for each row of (N, classes) probabilities, in float64."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: got {temperature!r}, expected a finite number > 0")
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), TINY, None))
    logits /= temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T in `TEMPERATURE_RANGE` minimising the NLL of `labels` under scale(p, T)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("fit_temperature: got no images, expected at least one")
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), TINY, None))

    def loss(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(labels.size), labels]))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-7})
    return float(math.exp(result.x))


# --- measures ------------------------------------------------------------------------------


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels, as Keras' categorical cross-entropy
    computes it: rows renormalised, then clipped to [EPSILON, 1 - EPSILON]. NaN for no images
    or non-finite probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0 or not np.isfinite(probabilities).all():
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = probabilities / probabilities.sum(axis=1, keepdims=True)
        picked = np.clip(rows[np.arange(labels.size), labels], EPSILON, 1 - EPSILON)
        return float(-np.mean(np.log(picked)))


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean over images of sum_k (p_k - [k == label])**2: 0 is perfect, 2 the worst."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return math.nan
    errors = probabilities.copy()
    errors[np.arange(labels.size), labels] -= 1
    return float(np.mean(np.sum(errors * errors, axis=1)))


@dataclass(frozen=True, eq=False)
class Reliability:
    """Per confidence bin ((b-1)/bins, b/bins]: images, mean confidence, accuracy (NaN when
    empty)."""

    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    def ece(self) -> float:
        """Expected calibration error: sum over bins of (images/N) |accuracy - confidence|."""
        total = int(self.counts.sum())
        if total == 0:
            return math.nan
        used = self.counts > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float(np.sum(self.counts[used] * gaps) / total)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = probabilities.max(axis=1) if labels.size else np.zeros(0)
    correct = probabilities.argmax(axis=1) == labels if labels.size else np.zeros(0, bool)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
    return Reliability(counts=counts, confidence=mean_conf, accuracy=accuracy)


def ece(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    return reliability(probabilities, labels, bins).ece()


# --- abstention ----------------------------------------------------------------------------


def selective(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(coverage, selective accuracy): the share of images answered (confidence >=
    `threshold`) and the accuracy on those; NaN accuracy when none is answered."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return math.nan, math.nan
    answered = probabilities.max(axis=1) >= threshold
    coverage = float(answered.mean())
    if not answered.any():
        return coverage, math.nan
    correct = probabilities.argmax(axis=1)[answered] == labels[answered]
    return coverage, float(correct.mean())


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The lowest confidence threshold whose answered images reach `target` accuracy: the
    widest coverage that meets it. Above every confidence (answer nothing) if none does."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 < target <= 1:
        raise ValueError(f"target selective accuracy: got {target!r}, expected (0, 1]")
    if labels.size == 0:
        raise ValueError("choose_threshold: got no images, expected at least one")
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    correct = (probabilities.argmax(axis=1) == labels)[order]
    answered = np.arange(1, labels.size + 1)
    accuracy = np.cumsum(correct) / answered
    # A threshold answers every image at or above it: only the last of equal confidences
    # is a place to cut.
    cuts = np.append(sorted_conf[1:] < sorted_conf[:-1], True)
    meets = np.flatnonzero(cuts & (accuracy >= target - 1e-12))
    if meets.size == 0:
        return float(np.nextafter(sorted_conf[0], np.inf))
    return float(sorted_conf[meets[-1]])


def fit(
    probabilities: np.ndarray,
    labels: np.ndarray,
    *,
    target: float,
    scale_temperature: bool,
    val_sha256: str,
) -> Calibration:
    """Temperature (1.0 when `scale_temperature` is off) and threshold from validation
    outputs; with the validation measures before and after."""
    temperature = fit_temperature(probabilities, labels) if scale_temperature else 1.0
    calibrated = scale(probabilities, temperature)
    threshold = choose_threshold(calibrated, labels, target)
    coverage, _ = selective(calibrated, labels, threshold)
    return Calibration(
        temperature=temperature,
        threshold=threshold,
        target_selective_accuracy=target,
        val_images=int(np.asarray(labels).size),
        val_sha256=val_sha256,
        val_nll_before=nll(probabilities, labels),
        val_nll_after=nll(calibrated, labels),
        val_ece_before=ece(probabilities, labels),
        val_ece_after=ece(calibrated, labels),
        val_coverage=coverage,
    )
