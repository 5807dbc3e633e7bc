"""Estimated accuracy on unlabelled traffic, from the champion's calibrated confidences.

Production requests come without labels, so accuracy there cannot be measured, only
estimated from how confident the model is. Two estimators:

- `mean_confidence` (CBPE, confidence-based performance estimation): if the confidences are
  calibrated, each answer is right with probability equal to its confidence, so the
  expected accuracy is their mean.
- `thresholded_confidence` (ATC, average thresholded confidence; Garg et al. 2022): learn on
  the reference the confidence threshold above which as many answers fall as were right,
  and count the window's answers above it.

Both are only as good as the calibration they rest on; see each function for where that
breaks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .drift import Reference

METHODS: tuple[str, ...] = ("atc", "cbpe")
DEFAULT_METHOD = "atc"  # tracks accuracy under shift where CBPE stays overconfident
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """An estimated accuracy with a two-sided `level` interval [low, high] over `n` requests."""

    method: str
    accuracy: float
    low: float
    high: float
    n: int
    level: float = DEFAULT_LEVEL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_confidence(window_confidence: np.ndarray, level: float = DEFAULT_LEVEL) -> Estimate:
    """CBPE: the expected accuracy of answers with calibrated confidences p_i is mean(p_i).

    The number right is then a sum of independent Bernoulli(p_i) (Poisson-binomial), whose
    accuracy has variance sum p_i (1 - p_i) / n^2; the interval is the normal approximation,
    clipped to [0, 1]. It covers the window's realised accuracy as long as the confidences
    stay calibrated, which is exactly what a distribution shift tends to break: under shift
    a temperature-scaled model stays overconfident and CBPE overestimates accuracy.
    """
    confidence = _confidences("window_confidence", window_confidence)
    z = _z(level)
    n = confidence.size
    accuracy = float(confidence.mean())
    half = z * math.sqrt(float(np.sum(confidence * (1 - confidence)))) / n
    return Estimate(
        "cbpe", accuracy, max(0.0, accuracy - half), min(1.0, accuracy + half), n, float(level)
    )


def thresholded_confidence(
    reference: Reference, window_confidence: np.ndarray, level: float = DEFAULT_LEVEL
) -> Estimate:
    """ATC (Garg et al. 2022, "Leveraging unlabeled data to predict out-of-distribution
    performance"): the share of window confidences above the threshold t at which the
    share of reference confidences above t equals the reference accuracy.

    Why not just the mean confidence: temperature scaling calibrates the model on the
    distribution it was fitted on, but under distribution shift the scaled confidences stay
    overconfident, so their mean overstates accuracy. ATC uses the confidences only to rank
    answers: a shifted image whose confidence falls below the threshold counts as wrong
    however far below it falls. Garg et al. found it tracks accuracy under shift markedly
    better than mean confidence.

    Ties matter: confidences saturate (many are exactly 1.0 in float32), so no threshold may
    split the reference exactly. Answers exactly at t then count fractionally, with the
    weight that makes the reference's share equal its accuracy, and the window's answers at
    t get the same weight.

    The interval is the Wilson score interval for the window's share (n = window size); it
    leaves out the uncertainty of the threshold, which the reference's size makes small.
    """
    confidence = _confidences("window_confidence", window_confidence)
    z = _z(level)
    threshold, weight = atc_threshold(reference)
    share = float(np.mean(confidence > threshold) + weight * np.mean(confidence == threshold))
    low, high = _wilson(share, confidence.size, z)
    return Estimate("atc", share, low, high, confidence.size, float(level))


def atc_threshold(reference: Reference) -> tuple[float, float]:
    """(t, w): reference confidences above t, plus w times those equal to t, make up exactly
    the reference accuracy. w is in [0, 1]."""
    confidence = _confidences("reference confidence", reference.confidence)
    n = confidence.size
    right = float(np.count_nonzero(reference.correct))  # as many "above" as were right
    ordered = np.sort(confidence)
    if right == 0:  # nothing right: a threshold above every confidence
        return float(np.nextafter(ordered[-1], np.inf)), 0.0
    threshold = ordered[n - int(right)]  # `right` of them are >= this one
    above = float(np.count_nonzero(ordered > threshold))
    at = float(np.count_nonzero(ordered == threshold))
    return float(threshold), (right - above) / at


def estimate(
    reference: Reference,
    window_confidence: np.ndarray,
    method: str = DEFAULT_METHOD,
    level: float = DEFAULT_LEVEL,
) -> Estimate:
    """The window's estimated accuracy by `method`: "atc" (`thresholded_confidence`) or
    "cbpe" (`mean_confidence`, which does not need the reference)."""
    if method == "atc":
        return thresholded_confidence(reference, window_confidence, level)
    if method == "cbpe":
        return mean_confidence(window_confidence, level)
    raise ValueError(f"method: got {method!r}, expected one of {METHODS}")


def _confidences(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name}: got shape {values.shape}, expected a non-empty 1-D array")
    if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise ValueError(
            f"{name}: got values in [{values.min()}, {values.max()}], expected "
            "calibrated confidences in [0, 1]"
        )
    return values


def _z(level: float) -> float:
    """The standard normal quantile of a two-sided `level` interval."""
    from scipy.stats import norm

    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level: got {level!r}, expected a number in (0, 1), e.g. 0.95")
    return float(norm.ppf(0.5 + level / 2))


def _wilson(share: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval for a share `share` of `n` trials (see
    `evaluation.scores.wilson_interval`, which takes whole counts)."""
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (share + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(max(share * (1 - share), 0.0) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
