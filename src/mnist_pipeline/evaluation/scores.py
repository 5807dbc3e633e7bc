"""Scores, per-image correctness and the evaluate stage's plots, from plain arrays.

Everything here works on labels and predicted probabilities that the model code has already
produced: no Keras, no MLflow. Bad model outputs (NaN probabilities, an empty test set) do
not raise; they give NaN metrics, so that the gate is the one place that refuses them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.splits import NUM_CLASSES
from ..files import rounded, write_json
from ..training.calibration import nll


@dataclass(frozen=True, eq=False)  # eq=False: the array fields make == ambiguous
class Scores:
    accuracy: float
    loss: float
    macro_f1: float
    precision: list[float]  # per class 0..9; 0.0 for a class never predicted
    recall: list[float]  # per class 0..9; 0.0 for a class absent from the labels
    f1: list[float]  # per class 0..9; 0.0 where precision + recall == 0
    support: list[int]  # per class 0..9: how many test images have that label
    confusion: np.ndarray  # (10, 10) int64, rows = true class, columns = predicted class
    predictions: np.ndarray  # (N,) uint8 argmax of the probabilities
    correct: np.ndarray  # (N,) bool, prediction == label


def score(labels: np.ndarray, probabilities: np.ndarray) -> Scores:
    """Accuracy, cross-entropy loss, per-class precision/recall/F1 and the confusion matrix.

    `labels` is (N,) integers in 0..9; `probabilities` is (N, 10), one softmax row per image.
    Shapes that do not fit raise `ValueError`. Non-finite probabilities do not: the loss
    becomes NaN (accuracy and the per-class scores still follow the argmax). N = 0 gives NaN
    accuracy, loss and macro F1.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: got {labels.dtype} {labels.shape}, expected integers (N,)")
    if probabilities.shape != (labels.shape[0], NUM_CLASSES):
        raise ValueError(
            f"probabilities: got shape {probabilities.shape}, expected "
            f"({labels.shape[0]}, {NUM_CLASSES}): one row per label, "
            "one column per class"
        )
    if not np.issubdtype(probabilities.dtype, np.number) or np.iscomplexobj(probabilities):
        raise ValueError(f"probabilities: got dtype {probabilities.dtype}, expected real numbers")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"labels: got values in [{labels.min()}, {labels.max()}], "
            f"expected classes 0..{NUM_CLASSES - 1}"
        )

    n = labels.shape[0]
    probabilities = probabilities.astype(np.float64)
    labels = labels.astype(np.int64)
    predictions = np.argmax(probabilities, axis=1).astype(np.uint8)  # NaN rows: first NaN
    correct = predictions == labels
    confusion = np.bincount(
        labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES * NUM_CLASSES
    ).reshape(NUM_CLASSES, NUM_CLASSES)

    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(true_pos, predicted)
    recall = _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)

    if n == 0:
        accuracy = loss = macro_f1 = math.nan
    else:
        accuracy = float(correct.mean())
        macro_f1 = float(f1.mean())
        # Keras' own loss: a confident mistake costs -log(1e-7) ~= 16.1, not infinity.
        loss = nll(probabilities, labels)

    return Scores(
        accuracy=accuracy,
        loss=loss,
        macro_f1=macro_f1,
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        support=support.astype(int).tolist(),
        confusion=confusion.astype(np.int64),
        predictions=predictions,
        correct=correct,
    )


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator element-wise, 0.0 where the denominator is 0."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


# --- reports -------------------------------------------------------------------------------


def metrics_dict(scores: Scores) -> dict[str, Any]:
    """Headline and per-class metrics, floats rounded to 6 digits (NaN stays NaN).

    `files.write_json` turns NaN into null when writing JSON.
    """
    per_class = {
        str(cls): {
            "precision": rounded(scores.precision[cls]),
            "recall": rounded(scores.recall[cls]),
            "f1": rounded(scores.f1[cls]),
            "support": int(scores.support[cls]),
        }
        for cls in range(NUM_CLASSES)
    }
    return {
        "test_accuracy": rounded(scores.accuracy),
        "test_loss": rounded(scores.loss),
        "test_macro_f1": rounded(scores.macro_f1),
        "per_class": per_class,
    }


def write_metrics(path: str | os.PathLike[str], scores: Scores) -> dict[str, Any]:
    """Write `metrics_dict(scores)` as strict JSON (NaN -> null) atomically; return the dict."""
    metrics = metrics_dict(scores)
    write_json(path, metrics)
    return metrics


# --- paired comparison ---------------------------------------------------------------------


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on two models' per-image correctness over the same images.

    Returns (b, c, p): b = images A gets right and B gets wrong, c = the reverse, and the
    two-sided exact binomial p-value of b against Binomial(b + c, 1/2). p = 1.0 when the
    models never disagree.
    """
    a = np.asarray(correct_a)
    b_arr = np.asarray(correct_b)
    if a.ndim != 1 or b_arr.ndim != 1 or a.shape != b_arr.shape:
        raise ValueError(
            f"correct arrays: got shapes {a.shape} and {b_arr.shape}, expected two "
            "1-D arrays of the same length (one entry per test image)"
        )
    a = a.astype(bool)
    b_arr = b_arr.astype(bool)
    b = int(np.count_nonzero(a & ~b_arr))
    c = int(np.count_nonzero(~a & b_arr))
    if b + c == 0:
        return b, c, 1.0
    return b, c, binomial_two_sided_half(min(b, c), b + c)


def binomial_two_sided_half(k: int, n: int) -> float:
    """P(X <= k or X >= n - k) for X ~ Binomial(n, 1/2), k <= n/2: the two-sided exact
    binomial test's p-value (as `scipy.stats.binomtest(k, n, 0.5)` gives it, without the
    second of import time scipy.stats costs). Exact integers, each term from the one before
    (C(n, i+1) = C(n, i)(n - i)/(i + 1)), then one correctly rounded division."""
    if not 0 <= k <= n / 2:
        raise ValueError(f"binomial test: got k={k} of n={n}, expected 0 <= k <= n/2")
    if 2 * k >= n - 1:  # the two tails cover every outcome
        return 1.0
    term = tail = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


# --- confidence intervals ------------------------------------------------------------------

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
Z_95_ONE_SIDED = 1.6448536269514722  # its 95% quantile: a one-sided 95% bound


def paired_difference(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Mean difference in accuracy between two models on the same (groups, images)
    correctness arrays, and its standard error clustered by image (axis 1): each image's
    mean difference over the groups is one observation, so the groups of one image (the
    corruptions of one test digit) are not counted as independent trials."""
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(
            f"correctness arrays: got shapes {a.shape} and {b.shape}, expected "
            "the same (groups, images) shape with at least 2 images"
        )
    per_image = (a - b).mean(axis=0)
    return float(per_image.mean()), float(per_image.std(ddof=1) / math.sqrt(per_image.size))


# Below this a p-value is shown as a bound: the normal tail underflows to 0.0 for z > 38.
P_SHOWN_DOWN_TO = 1e-300


def p_text(p: float, spec: str) -> str:
    """`p` in the format `spec` ('.3g', '.4f', ...), or '<1e-300' when too small to hold."""
    return f"<{P_SHOWN_DOWN_TO:.0e}" if p < P_SHOWN_DOWN_TO else format(p, spec)


def paired_z_test(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """The mean accuracy difference of `paired_difference` and its two-sided p-value against
    "no difference" (a z-test: the per-image means of 10,000 test images are many independent
    observations, so their mean is close to normal). p = 1.0 when the two never differ."""
    diff, se = paired_difference(ours, theirs)
    if se == 0:
        return diff, 1.0 if diff == 0 else 0.0
    return diff, math.erfc(abs(diff / se) / math.sqrt(2))


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `successes / trials` (95% by default).

    With p = successes / trials and n = trials:
        centre = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) * sqrt(p(1 - p)/n + z²/4n²)
    Unlike the normal ("Wald") interval it stays inside [0, 1] and is not empty at p = 0 or
    p = 1, which matters for per-class recalls near 1. (nan, nan) when `trials` is 0.
    """
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise ValueError(
            f"wilson_interval: got {successes} successes of {trials} trials, "
            "expected 0 <= successes <= trials"
        )
    if trials == 0:
        return math.nan, math.nan
    n, p, z2 = float(trials), successes / trials, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
