"""Scores, per-image correctness and the evaluate stage's plots, from plain arrays.

Everything here works on labels and predicted probabilities that the model code has already
produced: no Keras, no MLflow. Bad model outputs (NaN probabilities, an empty test set) do
not raise; they give NaN metrics, so that the gate is the one place that refuses them.

Plots use Matplotlib's object-oriented `Figure` directly (never `pyplot`): saving a `Figure`
to PNG renders with Agg without selecting a global backend or keeping figures alive, so the
library changes no process-wide state and needs no display.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from .data import NUM_CLASSES
from .files import atomic_open, write_json

# Keras' backend epsilon: probabilities are clipped to [EPSILON, 1 - EPSILON] before the
# log, exactly as `keras.losses.categorical_crossentropy` does, so a confident mistake
# costs -log(1e-7) ~= 16.1 instead of infinity and our loss matches Keras' own.
EPSILON = 1e-7
DPI = 100  # small, fast PNGs: these are glanced at in the DVC/MLflow UIs, not printed


@dataclass(frozen=True, eq=False)  # eq=False: the array fields make == ambiguous
class Scores:
    accuracy: float
    loss: float
    macro_f1: float
    precision: list[float]   # per class 0..9; 0.0 for a class never predicted
    recall: list[float]      # per class 0..9; 0.0 for a class absent from the labels
    f1: list[float]          # per class 0..9; 0.0 where precision + recall == 0
    support: list[int]       # per class 0..9: how many test images have that label
    confusion: np.ndarray    # (10, 10) int64, rows = true class, columns = predicted class
    predictions: np.ndarray  # (N,) uint8 argmax of the probabilities
    correct: np.ndarray      # (N,) bool, prediction == label


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
        raise ValueError(f"probabilities: got shape {probabilities.shape}, expected "
                         f"({labels.shape[0]}, {NUM_CLASSES}): one row per label, "
                         "one column per class")
    if not np.issubdtype(probabilities.dtype, np.number) or np.iscomplexobj(probabilities):
        raise ValueError(f"probabilities: got dtype {probabilities.dtype}, expected real numbers")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels: got values in [{labels.min()}, {labels.max()}], "
                         f"expected classes 0..{NUM_CLASSES - 1}")

    n = labels.shape[0]
    probabilities = probabilities.astype(np.float64)
    labels = labels.astype(np.int64)
    predictions = np.argmax(probabilities, axis=1).astype(np.uint8)  # NaN rows: first NaN
    correct = predictions == labels
    confusion = np.bincount(labels * NUM_CLASSES + predictions,
                            minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)

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
        loss = _cross_entropy(labels, probabilities)

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


def _cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy as Keras computes it; NaN if any input is not finite."""
    if not np.isfinite(probabilities).all():
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        # Keras renormalises each row before clipping; an all-zero row becomes NaN.
        rows = probabilities / probabilities.sum(axis=1, keepdims=True)
        picked = np.clip(rows[np.arange(labels.shape[0]), labels], EPSILON, 1 - EPSILON)
        return float(-np.mean(np.log(picked)))


# --- reports -------------------------------------------------------------------------------

def metrics_dict(scores: Scores) -> dict[str, Any]:
    """Headline and per-class metrics, floats rounded to 6 digits (NaN stays NaN).

    `files.write_json` turns NaN into null when writing JSON.
    """
    per_class = {
        str(cls): {
            "precision": _round(scores.precision[cls]),
            "recall": _round(scores.recall[cls]),
            "f1": _round(scores.f1[cls]),
            "support": int(scores.support[cls]),
        }
        for cls in range(NUM_CLASSES)
    }
    return {
        "test_accuracy": _round(scores.accuracy),
        "test_loss": _round(scores.loss),
        "test_macro_f1": _round(scores.macro_f1),
        "per_class": per_class,
    }


def write_metrics(path: str | os.PathLike[str], scores: Scores) -> dict[str, Any]:
    """Write `metrics_dict(scores)` as strict JSON (NaN -> null) atomically; return the dict."""
    metrics = metrics_dict(scores)
    write_json(path, metrics)
    return metrics


def _round(value: float) -> float:
    return round(float(value), 6) if math.isfinite(value) else math.nan


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
        raise ValueError(f"correct arrays: got shapes {a.shape} and {b_arr.shape}, expected two "
                         "1-D arrays of the same length (one entry per test image)")
    a = a.astype(bool)
    b_arr = b_arr.astype(bool)
    b = int(np.count_nonzero(a & ~b_arr))
    c = int(np.count_nonzero(~a & b_arr))
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


# --- plots and plot data -------------------------------------------------------------------

def write_confusion_csv(path: str | os.PathLike[str], labels: np.ndarray,
                        predictions: np.ndarray) -> None:
    """`actual,predicted`, one row per test image: what `dvc plots` `template: confusion` reads."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape}: "
                         "expected two 1-D arrays of the same length")
    with atomic_open(path, "w") as fh:
        fh.write("actual,predicted\n")
        fh.writelines(f"{int(a)},{int(p)}\n" for a, p in zip(labels, predictions))


def write_class_recall_csv(path: str | os.PathLike[str], recall: list[float]) -> None:
    """`class,recall`, one row per class, for a `dvc plots` bar or linear template."""
    with atomic_open(path, "w") as fh:
        fh.write("class,recall\n")
        fh.writelines(f"{cls},{_round(value)}\n" for cls, value in enumerate(recall))


def plot_confusion_png(path: str | os.PathLike[str], confusion: np.ndarray) -> None:
    """A labelled heatmap of the confusion matrix with the count in every cell."""
    confusion = np.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion: got shape {confusion.shape}, expected a square matrix")
    k = confusion.shape[0]
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({int(confusion.sum())} test images)")
    high = confusion.max() / 2 if confusion.size else 0
    for row in range(k):
        for col in range(k):
            value = int(confusion[row, col])
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                    color="white" if value > high else "black")
    _save(fig, path)


def plot_misclassified_grid(path: str | os.PathLike[str], images: np.ndarray,
                            labels: np.ndarray, predictions: np.ndarray,
                            probabilities: np.ndarray, limit: int) -> None:
    """Up to `limit` misclassified digits, most confident mistakes first.

    Each cell is titled `true 7 / pred 2 (0.83)`, the number being the probability the model
    gave its (wrong) prediction. With no mistakes the image says so.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    probabilities = np.asarray(probabilities)
    n = labels.shape[0] if labels.ndim == 1 else -1
    if (n < 0 or images.shape[:1] != (n,) or images.ndim != 3 or predictions.shape != (n,)
            or probabilities.ndim != 2 or probabilities.shape[0] != n):
        raise ValueError(f"images {images.shape}, labels {labels.shape}, predictions "
                         f"{predictions.shape}, probabilities {probabilities.shape}: expected "
                         "(N, H, W), (N,), (N,) and (N, classes) for the same N")
    if limit < 1:
        raise ValueError(f"limit: got {limit}, expected an integer >= 1")

    wrong = np.flatnonzero(labels != predictions)
    if wrong.size == 0:
        fig = _figure(4.0, 1.5)
        fig.text(0.5, 0.5, f"no misclassified images\n({n} of {n} correct)",
                 ha="center", va="center", fontsize=12)
        _save(fig, path)
        return

    confidence = probabilities[wrong, predictions[wrong].astype(np.int64)]
    # Most confident mistakes first; NaN confidences sort last; ties keep test-set order.
    order = np.argsort(-np.nan_to_num(confidence, nan=-np.inf), kind="stable")
    shown = wrong[order[:limit]]
    cols = math.ceil(math.sqrt(shown.size))
    rows = math.ceil(shown.size / cols)
    fig = _figure(1.3 * cols, 1.45 * rows + 0.4)
    fig.suptitle(f"{shown.size} of {wrong.size} misclassified (of {n})", fontsize=10)
    for slot, index in enumerate(shown):
        ax = fig.add_subplot(rows, cols, slot + 1)
        ax.imshow(images[index], cmap="gray_r", vmin=0, vmax=255)
        ax.set_axis_off()
        prob = probabilities[index, int(predictions[index])]
        ax.set_title(f"true {int(labels[index])} / pred {int(predictions[index])} ({prob:.2f})",
                     fontsize=7)
    _save(fig, path)


def plot_class_recall_png(path: str | os.PathLike[str], recall: list[float],
                          threshold: float | None = None) -> None:
    """Recall per class as bars; `threshold` (the gate's min_class_recall) as a dashed line."""
    values = np.asarray(recall, dtype=np.float64)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(range(values.size), np.nan_to_num(values, nan=0.0), color="tab:blue")
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.3f}",
                ha="center", va="bottom", fontsize=7)
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xticks(range(values.size))
    ax.set_xlabel("class")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.08)
    ax.set_title("test recall per class" if threshold is None
                 else f"test recall per class (dashed: min_class_recall {threshold:g})")
    _save(fig, path)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="tight")


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI)
    fig.clear()  # free the artists now; the Figure is never registered with pyplot
