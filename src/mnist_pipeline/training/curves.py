"""Training curves: the per-epoch history as a CSV for `dvc plots` and as a PNG."""

from __future__ import annotations

import csv
import io
import os

from ..files import atomic_path, write_text

COLUMNS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def write_history_csv(
    path: str | os.PathLike[str], history: dict[str, list[float]], first_epoch: int = 1
) -> None:
    """One row per epoch: `epoch,loss,accuracy,val_loss,val_accuracy,learning_rate`."""
    columns = [c for c in COLUMNS if c in history]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *columns])
    for index in range(len(history.get("loss", []))):
        writer.writerow([first_epoch + index, *(f"{history[c][index]:.6g}" for c in columns)])
    write_text(path, buffer.getvalue())


def plot_history_png(
    path: str | os.PathLike[str], history: dict[str, list[float]], title: str = ""
) -> None:
    """Loss and accuracy per epoch, train and validation side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(history.get("loss", [])) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if key in history:
                ax.plot(epochs, history[key], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
