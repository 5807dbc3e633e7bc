"""Calibration measures against hand-computed cases, the temperature fit against its closed
form, and the abstention threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mnist_pipeline.training import calibration


def rows(top: list[float], labels_of_top: list[int], n_classes: int = 10) -> np.ndarray:
    """One probability row per entry: `top` on class `labels_of_top`, the rest spread evenly."""
    out = np.zeros((len(top), n_classes))
    for i, (p, cls) in enumerate(zip(top, labels_of_top, strict=True)):
        out[i, :] = (1 - p) / (n_classes - 1)
        out[i, cls] = p
    return out


def test_calibration_ece_by_hand():
    # Confidences 0.9, 0.9 (bin 14 of 15: one right, one wrong) and 0.55, 0.55 (bin 9: both
    # right): |0.5 - 0.9| * 2/4 + |1.0 - 0.55| * 2/4 = 0.2 + 0.225.
    probabilities = rows([0.9, 0.9, 0.55, 0.55], [0, 0, 1, 2])
    labels = np.array([0, 3, 1, 2])
    assert calibration.ece(probabilities, labels) == pytest.approx(0.425)
    curve = calibration.reliability(probabilities, labels)
    assert curve.counts[13] == 2 and curve.counts[8] == 2 and curve.counts.sum() == 4
    assert curve.accuracy[13] == pytest.approx(0.5) and curve.confidence[8] == pytest.approx(0.55)
    assert math.isnan(calibration.ece(np.zeros((0, 10)), np.zeros(0, int)))


def test_calibration_brier_and_nll_by_hand():
    probabilities = np.zeros((2, 10))
    probabilities[0, [3, 4]] = 0.7, 0.3  # right: (0.7 - 1)^2 + 0.3^2 = 0.18
    probabilities[1, [5, 6]] = 0.6, 0.4  # wrong (label 6): 0.6^2 + (0.4 - 1)^2 = 0.72
    labels = np.array([3, 6])
    assert calibration.brier(probabilities, labels) == pytest.approx((0.18 + 0.72) / 2)
    assert calibration.nll(probabilities, labels) == pytest.approx(
        -(math.log(0.7) + math.log(0.4)) / 2
    )
    # Keras' clipping: a probability of 0 for the label costs -log(1e-7), not infinity.
    zero = np.zeros((1, 10))
    zero[0, 1] = 1.0
    assert calibration.nll(zero, np.array([0])) == pytest.approx(-math.log(1e-7))
    assert math.isnan(calibration.nll(np.full((1, 10), np.nan), np.array([0])))


def test_calibration_scale_is_softmax_of_logits_over_temperature():
    logits = np.array([[2.0, 1.0, -1.0, 0.5, 0, 0, 0, 0, 0, 3.0]])
    probabilities = np.exp(logits) / np.exp(logits).sum()
    for temperature in (0.5, 1.0, 2.5):
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        np.testing.assert_allclose(
            calibration.scale(probabilities, temperature), expected, rtol=1e-12
        )
    with pytest.raises(ValueError, match="temperature: got 0"):
        calibration.scale(probabilities, 0)


def test_calibration_temperature_fit_matches_its_closed_form():
    """Every image puts 0.99 on one class and 0.01 on a second; 90% of the labels are the
    first. Scaled, the top probability is sigmoid(gap / T) with gap = log(99), and the NLL is
    least where that equals the accuracy: T = log(99) / log(9)."""
    n = 1000
    probabilities = np.zeros((n, 10))
    probabilities[:, 0], probabilities[:, 1] = 0.99, 0.01
    labels = np.where(np.arange(n) < 900, 0, 1)
    fitted = calibration.fit_temperature(probabilities, labels)
    assert fitted == pytest.approx(math.log(99) / math.log(9), rel=1e-4)
    # An underconfident model (label smoothing) gets T < 1: sharper.
    soft = np.zeros((n, 10))
    soft[:, 0], soft[:, 1] = 0.6, 0.4
    assert calibration.fit_temperature(soft, np.where(np.arange(n) < 990, 0, 1)) < 1


def test_abstain_threshold_is_the_widest_coverage_meeting_the_target():
    # Confidences 0.99 0.95 0.9 0.8 0.7; right, right, wrong, right, wrong.
    probabilities = rows([0.99, 0.95, 0.9, 0.8, 0.7], [0, 0, 0, 0, 0])
    labels = np.array([0, 0, 1, 0, 1])
    # Accuracy of the top k: 1, 1, 2/3, 3/4, 3/5.
    assert calibration.choose_threshold(probabilities, labels, 0.75) == pytest.approx(0.8)
    assert calibration.choose_threshold(probabilities, labels, 1.0) == pytest.approx(0.95)
    assert calibration.choose_threshold(probabilities, labels, 0.5) == pytest.approx(0.7)
    coverage, accuracy = calibration.selective(probabilities, labels, 0.8)
    assert coverage == pytest.approx(0.8) and accuracy == pytest.approx(0.75)


def test_abstain_never_cuts_between_equal_confidences():
    probabilities = rows([0.9, 0.9], [0, 0])
    labels = np.array([0, 1])
    threshold = calibration.choose_threshold(probabilities, labels, 1.0)
    assert threshold > 0.9  # both or neither: neither reaches 100%, so nothing is answered
    coverage, accuracy = calibration.selective(probabilities, labels, threshold)
    assert coverage == 0.0 and math.isnan(accuracy)


def test_calibration_fit_records_validation_before_and_after():
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 10, n)
    # An underconfident model: right 95% of the time, but only 0.5 on its answer.
    answer = np.where(rng.random(n) < 0.95, labels, (labels + 1) % 10)
    probabilities = rows([0.5] * n, answer.tolist())
    fitted = calibration.fit(
        probabilities, labels, target=0.99, scale_temperature=True, val_sha256="v" * 64
    )
    assert fitted.temperature < 1
    assert fitted.val_ece_after < 0.01 < fitted.val_ece_before
    assert fitted.val_nll_after < fitted.val_nll_before
    off = calibration.fit(
        probabilities, labels, target=0.99, scale_temperature=False, val_sha256="v" * 64
    )
    assert off.temperature == 1.0
    assert calibration.Calibration.from_dict({**fitted.to_dict(), "extra": 1}) == fitted


def test_served_calibration_equals_the_trained_one():
    """The served model rescales with its own copy (it imports nothing of this package)."""
    from mnist_pipeline.tracking.mnist_onnx import calibrated

    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(10), size=50).astype(np.float32)
    # Rows a softmax really gives: sure of one class (exact zeros elsewhere), and torn.
    probabilities[0] = np.eye(10, dtype=np.float32)[3]
    probabilities[1] = [0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0]
    probabilities[2] = 0.1
    low, high = calibration.TEMPERATURE_RANGE
    for temperature in (low, 0.46, 1.0, 1.7, high):
        np.testing.assert_allclose(
            calibrated(probabilities, temperature),
            calibration.scale(probabilities, temperature),
            atol=1e-6,
        )
