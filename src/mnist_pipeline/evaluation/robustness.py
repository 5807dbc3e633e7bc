"""What a model does beyond the clean test set: accuracy on each corruption of the suite, and
how far its confidence can be trusted (calibration and abstention), from plain arrays.

`Shift.measure` takes the model's raw softmax outputs on the clean test images and on every
corrupted copy, with the calibration that travels with the model (`training.calibration`),
and keeps what the gate, the metrics file, the plots and the card need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..files import rounded
from ..training import calibration
from ..training.calibration import Calibration, Reliability


@dataclass(frozen=True, eq=False)
class Confidence:
    """Calibration and abstention on one set of images, with the model's calibration."""

    nll_raw: float
    nll: float
    brier_raw: float
    brier: float
    ece_raw: float
    ece: float
    coverage: float  # share answered (calibrated confidence >= threshold)
    selective_accuracy: float  # accuracy on the answered ones
    reliability_raw: Reliability
    reliability: Reliability

    @classmethod
    def measure(cls, raw: np.ndarray, labels: np.ndarray, fitted: Calibration) -> Confidence:
        scaled = calibration.scale(raw, fitted.temperature)
        coverage, selective = calibration.selective(scaled, labels, fitted.threshold)
        before = calibration.reliability(raw, labels)
        after = calibration.reliability(scaled, labels)
        return cls(
            nll_raw=calibration.nll(raw, labels),
            nll=calibration.nll(scaled, labels),
            brier_raw=calibration.brier(raw, labels),
            brier=calibration.brier(scaled, labels),
            ece_raw=before.ece(),
            ece=after.ece(),
            coverage=coverage,
            selective_accuracy=selective,
            reliability_raw=before,
            reliability=after,
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "nll": rounded(self.nll),
            "nll_uncalibrated": rounded(self.nll_raw),
            "brier": rounded(self.brier),
            "brier_uncalibrated": rounded(self.brier_raw),
            "ece": rounded(self.ece),
            "ece_uncalibrated": rounded(self.ece_raw),
            "coverage": rounded(self.coverage),
            "selective_accuracy": rounded(self.selective_accuracy),
        }


@dataclass(frozen=True, eq=False)
class Shift:
    """A model's results on the corrupted suite, and its confidence on clean and corrupted
    images."""

    names: list[str]  # the corruptions, in the suite's order
    correct: np.ndarray  # (corruptions, N) bool
    suite_sha256: str
    calibration: Calibration
    clean: Confidence
    corrupted: Confidence  # all corrupted images pooled

    @classmethod
    def measure(
        cls,
        clean_raw: np.ndarray,
        corrupted_raw: np.ndarray,
        labels: np.ndarray,
        names: list[str],
        suite_sha256: str,
        fitted: Calibration,
    ) -> Shift:
        """`clean_raw` (N, 10) and `corrupted_raw` (corruptions, N, 10) raw probabilities."""
        corrupted_raw = np.asarray(corrupted_raw)
        if corrupted_raw.shape != (len(names), *np.shape(clean_raw)):
            raise ValueError(
                f"corrupted outputs: got shape {corrupted_raw.shape}, expected "
                f"({len(names)}, *{np.shape(clean_raw)}): one clean-shaped block "
                "per corruption"
            )
        correct = corrupted_raw.argmax(axis=2) == np.asarray(labels)[None, :]
        pooled = corrupted_raw.reshape(-1, corrupted_raw.shape[-1])
        return cls(
            names=list(names),
            correct=correct,
            suite_sha256=suite_sha256,
            calibration=fitted,
            clean=Confidence.measure(clean_raw, labels, fitted),
            corrupted=Confidence.measure(pooled, np.tile(labels, len(names)), fitted),
        )

    @property
    def accuracy(self) -> dict[str, float]:
        """Accuracy per corruption."""
        return {
            name: float(self.correct[i].mean()) if self.correct.shape[1] else math.nan
            for i, name in enumerate(self.names)
        }

    @property
    def mean_accuracy(self) -> float:
        """Mean corruption accuracy: the mean of the per-corruption accuracies."""
        return float(self.correct.mean()) if self.correct.size else math.nan

    @property
    def worst(self) -> tuple[str, float]:
        name, value = min(self.accuracy.items(), key=lambda item: item[1])
        return name, value

    def metrics(self) -> dict[str, Any]:
        """For metrics/evaluate.json: robustness, calibration and abstention."""
        worst, worst_accuracy = self.worst
        return {
            "corrupted_mean_accuracy": rounded(self.mean_accuracy),
            "corrupted_worst": worst,
            "corrupted_worst_accuracy": rounded(worst_accuracy),
            "temperature": rounded(self.calibration.temperature),
            "abstain_threshold": rounded(self.calibration.threshold),
            "clean": self.clean.to_dict(),
            "corrupted": self.corrupted.to_dict(),
            "corrupted_accuracy": {name: rounded(value) for name, value in self.accuracy.items()},
        }

    def flat_metrics(self) -> dict[str, float]:
        """The same as MLflow metrics (numbers only, flat names)."""
        out = {
            "corrupted_mean_accuracy": self.mean_accuracy,
            "corrupted_worst_accuracy": self.worst[1],
            "calibration_temperature": self.calibration.temperature,
            "abstain_threshold": self.calibration.threshold,
        }
        for prefix, confidence in (("test", self.clean), ("corrupted", self.corrupted)):
            out.update({f"{prefix}_{key}": value for key, value in confidence.to_dict().items()})
        out.update({f"corrupted_accuracy_{name}": value for name, value in self.accuracy.items()})
        return out
