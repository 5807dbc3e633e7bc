"""Drift tests: does a window of production traffic still look like the clean test set?

The champion was certified on the clean test set, so its calibrated outputs there are the
`Reference`. A window of traffic (say the last 500 requests) is compared with it by one test
per statistic: a chi-square test on the mix of predicted classes, and a two-sample
Kolmogorov-Smirnov test on the confidence, the entropy and each input statistic of
`features.INPUT_STATISTICS`. Ten tests on every window would raise a false alarm ten times
as often as one, so each test is held to alpha / (number of tests) (Bonferroni): `alpha` is
the chance that a window drawn from the reference's own distribution raises any alarm.
Optionally a KS test must also show a distance D of at least `min_distance` (see `compare`
for why real traffic needs it).

Plain NumPy and SciPy on arrays: the request log and the server are elsewhere.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, fields, replace
from typing import Any, Self

import numpy as np

from ..data.splits import NUM_CLASSES
from ..errors import DataError
from ..files import atomic_path
from .features import INPUT_STATISTICS, input_statistics, output_statistics

FORMAT = 1  # the layout of a saved Reference; bump it when the keys change
# Fewer rows than this and neither the chi-square approximation nor KS has power to speak of.
MIN_WINDOW = 20
# One false alarm in a thousand clean windows: a monitor that cries wolf gets switched off.
DEFAULT_ALPHA = 0.001


@dataclass(frozen=True, eq=False)  # eq=False: the array fields make == ambiguous
class Outputs:
    """The monitored view of N answered requests: what was asked (`inputs`, the
    `INPUT_STATISTICS` of each image) and what was answered (`predicted` class, calibrated
    `confidence`, `entropy` of the probabilities)."""

    predicted: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float
    entropy: np.ndarray  # (N,) float, nats
    inputs: np.ndarray  # (N, len(INPUT_STATISTICS)) float

    def __post_init__(self) -> None:
        columns = len(INPUT_STATISTICS)
        inputs = np.asarray(self.inputs)
        if inputs.ndim != 2 or inputs.shape[1] != columns:
            raise ValueError(
                f"inputs: got shape {inputs.shape}, expected (N, {columns}): "
                f"one column per statistic in {INPUT_STATISTICS}"
            )
        rows = inputs.shape[0]
        for field in fields(self):
            values = np.asarray(getattr(self, field.name))
            if field.name != "inputs" and values.ndim != 1:
                raise ValueError(
                    f"{field.name}: got shape {values.shape}, expected a 1-D "
                    "array with one entry per request"
                )
            if values.shape[0] != rows:
                raise ValueError(
                    f"{field.name}: got {values.shape[0]} rows, expected {rows} "
                    "(as many as inputs): every field describes the same requests"
                )
            object.__setattr__(self, field.name, values)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @classmethod
    def of(cls, images: np.ndarray, probabilities: np.ndarray) -> Outputs:
        """The monitored view of uint8 (N, 28, 28) `images` and the calibrated (N, classes)
        `probabilities` the model answered them with."""
        predicted, confidence, entropy = output_statistics(probabilities)
        return Outputs(
            predicted=predicted,
            confidence=confidence,
            entropy=entropy,
            inputs=input_statistics(images),
        )

    def take(self, index: Any) -> Self:
        """The rows `index` selects (a slice, indices or a mask), as the same type."""
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass(frozen=True, eq=False)
class Reference(Outputs):
    """The champion's calibrated outputs on the clean, labelled test set: what traffic
    is compared with, and (through `correct`) what its accuracy is known to be there."""

    correct: np.ndarray  # (N,) bool: was each prediction right

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.correct.dtype != np.bool_:
            raise ValueError(
                f"correct: got dtype {self.correct.dtype}, expected bool "
                "(whether each reference prediction was right)"
            )

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self) else math.nan

    @classmethod
    def labelled(
        cls, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray
    ) -> Reference:
        """The reference from the clean test `images`, the champion's calibrated
        `probabilities` on them and the true `labels`."""
        window = Outputs.of(images, probabilities)
        labels = np.asarray(labels)
        if labels.shape != window.predicted.shape:
            raise ValueError(
                f"labels: got shape {labels.shape}, expected "
                f"{window.predicted.shape} (one per image)"
            )
        return cls(
            predicted=window.predicted,
            confidence=window.confidence,
            entropy=window.entropy,
            inputs=window.inputs,
            correct=window.predicted == labels.astype(np.int64),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an uncompressed `.npz` atomically (a reader never sees half a file)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, format=np.int64(FORMAT), statistics=np.array(INPUT_STATISTICS), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Reference:
        """The reference `save` wrote to `path`; `DataError` naming the file and the key when
        it is missing, unreadable, of another format or inconsistent."""
        redo = "write the reference again from the champion's test-set outputs"
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = set(archive.files)
                for key in ("format", "statistics", *(f.name for f in fields(cls))):
                    if key not in keys:
                        raise DataError(f"{path}: missing key '{key}' (has {sorted(keys)}); {redo}")
                version = int(archive["format"])
                if version != FORMAT:
                    raise DataError(f"{path}: key 'format' is {version}, expected {FORMAT}; {redo}")
                statistics = tuple(str(s) for s in archive["statistics"])
                if statistics != INPUT_STATISTICS:
                    raise DataError(
                        f"{path}: key 'statistics' is {statistics}, expected "
                        f"{INPUT_STATISTICS}; {redo}"
                    )
                arrays = {f.name: archive[f.name] for f in fields(cls)}
        except FileNotFoundError:
            raise DataError(f"{path}: not found; {redo}") from None
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DataError(f"{path}: not a readable .npz ({err}); {redo}") from None
        try:
            return cls(**arrays)
        except ValueError as err:
            raise DataError(f"{path}: {err}; {redo}") from None


@dataclass(frozen=True)
class Test:
    """One drift test of one statistic: reference against window."""

    name: str  # "class_mix", "confidence", "entropy" or "input:<statistic>"
    statistic: float  # chi-square statistic, or the KS distance D
    p_value: float
    shift: float  # class mix: total variation distance; KS: window median - reference's
    fired: bool = False  # below the per-test level, and far enough (set by `compare`)


@dataclass(frozen=True)
class Drift:
    """Every test on one window, and the levels they were held to."""

    tests: tuple[Test, ...]
    alpha: float  # family-wise: the chance that a no-drift window raises any alarm
    level: float  # per test: alpha / len(tests) (Bonferroni)
    min_distance: float = 0.0  # the smallest KS distance D that fires (see `compare`)

    @property
    def alarm(self) -> bool:
        return any(test.fired for test in self.tests)

    @property
    def fired(self) -> tuple[str, ...]:
        return tuple(test.name for test in self.tests if test.fired)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (NaN would not be: no test returns it)."""
        return {
            "alarm": self.alarm,
            "alpha": self.alpha,
            "level": self.level,
            "min_distance": self.min_distance,
            "fired": list(self.fired),
            "tests": [
                {
                    "name": t.name,
                    "statistic": float(t.statistic),
                    "p_value": float(t.p_value),
                    "shift": float(t.shift),
                    "fired": bool(t.fired),
                }
                for t in self.tests
            ],
        }


def class_mix_test(reference_predicted: np.ndarray, window_predicted: np.ndarray) -> Test:
    """Chi-square test of homogeneity: were the window's predicted classes drawn in the
    reference's proportions? Classes predicted in neither are left out (they have no
    expected count); with one class left there is nothing to compare (p = 1)."""
    from scipy.stats import chi2_contingency

    reference_counts = _class_counts("reference_predicted", reference_predicted)
    window_counts = _class_counts("window_predicted", window_predicted)
    shift = 0.5 * float(
        np.abs(
            reference_counts / reference_counts.sum() - window_counts / window_counts.sum()
        ).sum()
    )
    table = np.stack([reference_counts, window_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return Test("class_mix", statistic=0.0, p_value=1.0, shift=shift)
    # Yates' correction only ever applies to one degree of freedom (two classes); leaving it
    # off keeps every window's statistic the same plain chi-square.
    result = chi2_contingency(table, correction=False)
    return Test(
        "class_mix", statistic=float(result.statistic), p_value=float(result.pvalue), shift=shift
    )


def ks_test(name: str, reference_values: np.ndarray, window_values: np.ndarray) -> Test:
    """Two-sided two-sample Kolmogorov-Smirnov test of one statistic; `shift` is the window's
    median minus the reference's, in the statistic's own units."""
    from scipy.stats import ks_2samp

    reference_values = _sample(f"{name}: reference_values", reference_values)
    window_values = _sample(f"{name}: window_values", window_values)
    shift = float(np.median(window_values) - np.median(reference_values))
    if (
        reference_values.min()
        == reference_values.max()
        == window_values.min()
        == window_values.max()
    ):
        return Test(name, statistic=0.0, p_value=1.0, shift=shift)  # the same constant
    # The asymptotic distribution is exact enough at these sizes and far faster than the
    # exact one, which scipy would otherwise pick for a window of a few hundred.
    result = ks_2samp(reference_values, window_values, alternative="two-sided", method="asymp")
    return Test(name, statistic=float(result.statistic), p_value=float(result.pvalue), shift=shift)


def compare(
    reference: Outputs, window: Outputs, alpha: float = DEFAULT_ALPHA, *, min_distance: float = 0.0
) -> Drift:
    """Every drift test of `window` against `reference`; a test fires when its p-value is
    below alpha / (number of tests) and, for a KS test, its distance D is at least
    `min_distance`.

    Why a floor on D: against a 10,000-image reference a window of 500 makes KS detect
    differences no one would act on. Real traffic comes in runs from the same writers, and
    on the MNIST test set itself, in its own order, windows of 500 differ from the whole by
    D up to 0.27 in ink, mean and contrast (thick or thin pens; up to 0.38 against a
    reference from other writers): p-values alone raise an alarm on most clean windows.
    For the trained CNN, each of the 15 corruptions moves some statistic by D >= 0.41.
    D is the largest gap between the two cumulative distributions, a share of requests, so
    a floor reads as "at least this much of the traffic moved". The class mix test keeps
    the p-value rule alone: it never fired on a clean window.

    Args:
        reference: the champion's outputs on the clean test set.
        window: recent traffic, at least `MIN_WINDOW` requests.
        alpha: the family-wise false-alarm rate per window, in (0, 1).
        min_distance: the smallest KS distance D that can fire, in [0, 1); 0 means the
            p-value alone decides.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(
            f"alpha: got {alpha!r}, expected a number in (0, 1): the chance "
            "that a window without drift raises an alarm"
        )
    if (
        isinstance(min_distance, bool)
        or not isinstance(min_distance, (int, float))
        or not 0 <= min_distance < 1
    ):
        raise ValueError(
            f"min_distance: got {min_distance!r}, expected a number in [0, 1): "
            "the smallest KS distance (share of requests moved) that can fire"
        )
    for name, outputs in (("reference", reference), ("window", window)):
        if len(outputs) < MIN_WINDOW:
            raise ValueError(
                f"{name}: got {len(outputs)} requests, expected at least "
                f"{MIN_WINDOW} for the tests to mean anything"
            )
    tests = [
        class_mix_test(reference.predicted, window.predicted),
        ks_test("confidence", reference.confidence, window.confidence),
        ks_test("entropy", reference.entropy, window.entropy),
    ]
    tests += [
        ks_test(f"input:{stat}", reference.inputs[:, i], window.inputs[:, i])
        for i, stat in enumerate(INPUT_STATISTICS)
    ]
    level = float(alpha) / len(tests)
    return Drift(
        tests=tuple(replace(test, fired=_fires(test, level, min_distance)) for test in tests),
        alpha=float(alpha),
        level=level,
        min_distance=float(min_distance),
    )


def _fires(test: Test, level: float, min_distance: float) -> bool:
    if test.p_value >= level:
        return False
    return test.name == "class_mix" or test.statistic >= min_distance


def _class_counts(name: str, predicted: np.ndarray) -> np.ndarray:
    predicted = np.asarray(predicted)
    if predicted.ndim != 1 or predicted.size == 0 or not np.issubdtype(predicted.dtype, np.integer):
        raise ValueError(
            f"{name}: got shape {predicted.shape} dtype {predicted.dtype}, "
            "expected a non-empty 1-D array of class indices"
        )
    if predicted.min() < 0:
        raise ValueError(f"{name}: got class {int(predicted.min())}, expected indices >= 0")
    return np.bincount(predicted, minlength=NUM_CLASSES).astype(np.float64)


def _sample(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(
            f"{name}: got shape {values.shape}, expected a non-empty 1-D array of finite numbers"
        )
    return values
