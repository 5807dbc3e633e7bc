"""The evaluate stage's plots and plot data (confusion matrix, misclassified digits, recall
per class), from plain arrays.

Plots use Matplotlib's object-oriented `Figure` directly (never `pyplot`): saving a `Figure`
to PNG renders with Agg without selecting a global backend or keeping figures alive, so the
library changes no process-wide state and needs no display.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..files import atomic_open, rounded

DPI = 100  # small, fast PNGs: these are glanced at in the DVC/MLflow UIs, not printed


# --- plots and plot data -------------------------------------------------------------------


def write_confusion_csv(
    path: str | os.PathLike[str], labels: np.ndarray, predictions: np.ndarray
) -> None:
    """`actual,predicted`, one row per test image: what `dvc plots` `template: confusion` reads."""
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(
            f"labels {labels.shape} and predictions {predictions.shape}: "
            "expected two 1-D arrays of the same length"
        )
    with atomic_open(path, "w") as fh:
        fh.write("actual,predicted\n")
        fh.writelines(f"{int(a)},{int(p)}\n" for a, p in zip(labels, predictions, strict=True))


def write_class_recall_csv(path: str | os.PathLike[str], recall: list[float]) -> None:
    """`class,recall`, one row per class, for a `dvc plots` bar or linear template."""
    with atomic_open(path, "w") as fh:
        fh.write("class,recall\n")
        fh.writelines(f"{cls},{rounded(value)}\n" for cls, value in enumerate(recall))


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
            ax.text(
                col,
                row,
                str(value),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > high else "black",
            )
    _save(fig, path)


def plot_misclassified_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probabilities: np.ndarray,
    limit: int,
) -> None:
    """Up to `limit` misclassified digits, most confident mistakes first.

    Each cell is titled `true 7 / pred 2 (0.83)`, the number being the probability the model
    gave its (wrong) prediction. With no mistakes the image says so.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    probabilities = np.asarray(probabilities)
    n = labels.shape[0] if labels.ndim == 1 else -1
    if (
        n < 0
        or images.shape[:1] != (n,)
        or images.ndim != 3
        or predictions.shape != (n,)
        or probabilities.ndim != 2
        or probabilities.shape[0] != n
    ):
        raise ValueError(
            f"images {images.shape}, labels {labels.shape}, predictions "
            f"{predictions.shape}, probabilities {probabilities.shape}: expected "
            "(N, H, W), (N,), (N,) and (N, classes) for the same N"
        )
    if limit < 1:
        raise ValueError(f"limit: got {limit}, expected an integer >= 1")

    wrong = np.flatnonzero(labels != predictions)
    if wrong.size == 0:
        fig = _figure(4.0, 1.5)
        fig.text(
            0.5,
            0.5,
            f"no misclassified images\n({n} of {n} correct)",
            ha="center",
            va="center",
            fontsize=12,
        )
        _save(fig, path)
        return

    confidence = probabilities[wrong, predictions[wrong].astype(np.int64)]
    # Most confident mistakes first; NaN confidences sort last; ties keep test-set order.
    order = np.argsort(-np.nan_to_num(confidence, nan=-np.inf), kind="stable")
    shown = wrong[order[:limit]]
    _save_mosaic(
        path,
        images[shown],
        [
            f"true {int(labels[i])} / pred {int(predictions[i])} "
            f"({probabilities[i, int(predictions[i])]:.2f})"
            for i in shown
        ],
        f"{shown.size} of {wrong.size} misclassified (of {n})",
    )


# Each digit's cell in the mosaic, in image pixels: a band for its title above it, a margin
# around it; and the figure inches one cell takes.
_CELL_PAD, _CELL_TITLE = 4, 12
_CELL_INCHES = 1.3
_SUPTITLE_INCHES = 0.4


def plot_corruption_examples(
    path: str | os.PathLike[str],
    clean: np.ndarray,
    corrupted: dict[str, np.ndarray],
    count: int = 8,
) -> None:
    """One row per corruption (the clean digits first), the same `count` test digits in each."""
    rows = {"clean": clean, **corrupted}
    images = np.concatenate([np.asarray(row[:count]) for row in rows.values()])
    titles = [name if i == 0 else "" for name in rows for i in range(count)]
    _save_mosaic(
        path,
        images,
        titles,
        f"the corrupted test suite: {len(corrupted)} corruptions of the same {count} test digits",
        cols=count,
    )


def _save_mosaic(
    path: str | os.PathLike[str],
    images: np.ndarray,
    titles: list[str],
    suptitle: str,
    cols: int | None = None,
) -> None:
    """Images in a grid (square-ish unless `cols` is given), each titled, drawn as ONE image
    on one Axes: a subplot per digit made this plot take ~1.2 s (36 Axes laid out and
    rendered); this takes ~0.2."""
    count, height, width = images.shape
    cols = cols or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_w, cell_h = width + 2 * _CELL_PAD, height + _CELL_TITLE + _CELL_PAD
    canvas = np.zeros((rows * cell_h, cols * cell_w), dtype=images.dtype)
    for slot, image in enumerate(images):
        row, col = divmod(slot, cols)
        top, left = row * cell_h + _CELL_TITLE, col * cell_w + _CELL_PAD
        canvas[top : top + height, left : left + width] = image
    inches_per_pixel = _CELL_INCHES / cell_w  # square pixels
    plot_h = rows * cell_h * inches_per_pixel
    fig = _figure(cols * _CELL_INCHES, plot_h + _SUPTITLE_INCHES, tight=False)
    ax = fig.add_axes((0, 0, 1, plot_h / (plot_h + _SUPTITLE_INCHES)))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for slot, title in enumerate(titles):
        row, col = divmod(slot, cols)
        ax.text(
            col * cell_w + cell_w / 2,
            row * cell_h + _CELL_TITLE - 2,
            title,
            ha="center",
            va="bottom",
            fontsize=7,
        )
    fig.suptitle(suptitle, fontsize=10, y=1 - 0.12 / (plot_h + _SUPTITLE_INCHES))
    _save(fig, path)


def plot_class_recall_png(
    path: str | os.PathLike[str], recall: list[float], threshold: float | None = None
) -> None:
    """Recall per class as bars; `threshold` (the gate's min_class_recall) as a dashed line."""
    values = np.asarray(recall, dtype=np.float64)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    bars = ax.bar(range(values.size), np.nan_to_num(values, nan=0.0), color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"{value:.3f}",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if threshold is not None:
        ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xticks(range(values.size))
    ax.set_xlabel("class")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.08)
    ax.set_title(
        "test recall per class"
        if threshold is None
        else f"test recall per class (dashed: min_class_recall {threshold:g})"
    )
    _save(fig, path)


def _figure(width: float, height: float, tight: bool = True) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="tight" if tight else None)


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI)
    fig.clear()  # free the artists now; the Figure is never registered with pyplot


# --- robustness and calibration ------------------------------------------------------------


def write_corruption_csv(
    path: str | os.PathLike[str], accuracy: dict[str, float], champion: dict[str, float] | None
) -> None:
    """`corruption,candidate,champion`, one row per corruption (champion empty without one)."""
    with atomic_open(path, "w") as fh:
        fh.write("corruption,candidate,champion\n")
        fh.writelines(
            f"{name},{rounded(value)},"
            f"{'' if champion is None else rounded(champion.get(name, math.nan))}\n"
            for name, value in accuracy.items()
        )


def plot_corruption_png(
    path: str | os.PathLike[str], accuracy: dict[str, float], champion: dict[str, float] | None
) -> None:
    """Accuracy per corruption as horizontal bars, the champion's beside the candidate's."""
    names = list(accuracy)
    rows = np.arange(len(names))
    fig = _figure(6.4, 0.32 * len(names) + 1.4)
    ax = fig.add_subplot()
    height = 0.4 if champion is not None else 0.7
    ours = np.asarray([accuracy[n] for n in names])
    ax.barh(
        rows,
        ours,
        height=height,
        color="tab:blue",
        label=f"candidate (mean {np.mean(ours):.3f})" if names else "candidate",
    )
    if champion is not None:
        theirs = np.asarray([champion.get(n, math.nan) for n in names])
        ax.barh(
            rows + height,
            theirs,
            height=height,
            color="tab:gray",
            label=f"champion (mean {np.nanmean(theirs):.3f})" if names else "champion",
        )
    ax.set_yticks(rows + (height / 2 if champion is not None else 0))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("accuracy per corruption (corrupted test suite)")
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def write_reliability_csv(path: str | os.PathLike[str], curves: dict[str, Any]) -> None:
    """`curve,bin,confidence,accuracy,images`, one row per non-empty confidence bin of each
    curve (`training.calibration.Reliability`)."""
    with atomic_open(path, "w") as fh:
        fh.write("curve,bin,confidence,accuracy,images\n")
        for name, curve in curves.items():
            for index, count in enumerate(curve.counts):
                if count:
                    fh.write(
                        f"{name},{index + 1},{rounded(curve.confidence[index])},"
                        f"{rounded(curve.accuracy[index])},{int(count)}\n"
                    )


def plot_reliability_png(
    path: str | os.PathLike[str], curves: dict[str, Any], temperature: float
) -> None:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), with each
    curve's expected calibration error in its label."""
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="perfect")
    for (name, curve), style in zip(curves.items(), ("o--", "o-", "s-"), strict=False):
        used = curve.counts > 0
        ax.plot(
            curve.confidence[used],
            curve.accuracy[used],
            style,
            markersize=4,
            label=f"{name} (ECE {curve.ece():.4f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability), 15 bins")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (temperature {temperature:.3g}, fitted on validation)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
