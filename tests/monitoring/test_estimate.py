"""Estimated accuracy without labels, on synthetic confidences whose correctness is drawn
from them: where each estimator is right, and where its assumption breaks."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_pipeline.monitoring.drift import Reference
from mnist_pipeline.monitoring.estimate import (
    Estimate,
    atc_threshold,
    estimate,
    mean_confidence,
    thresholded_confidence,
)


def calibrated(n: int, rng: np.random.Generator, hard: float = 0.05):
    """(confidence, correct) for `n` answers: a share `hard` of them unsure (Beta(2, 2)),
    the rest sure (Beta(50, 1)), as a good model's confidences are; each answer is right
    with probability equal to its confidence."""
    is_hard = rng.random(n) < hard
    confidence = np.where(is_hard, rng.beta(2, 2, n), rng.beta(50, 1, n)).clip(0.1, 1)
    return confidence, rng.random(n) < confidence


def reference_of(confidence: np.ndarray, correct: np.ndarray) -> Reference:
    n = confidence.size
    return Reference(
        predicted=np.zeros(n, np.int64),
        confidence=confidence.astype(np.float32),
        entropy=np.zeros(n, np.float32),
        inputs=np.zeros((n, 7), np.float32),
        correct=correct,
    )


@pytest.fixture(scope="module")
def reference() -> Reference:
    return reference_of(*calibrated(10_000, np.random.default_rng(0)))


def test_monitor_cbpe_interval_covers_the_realised_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        confidence, correct = calibrated(500, rng)
        result = mean_confidence(confidence)
        covered += result.low <= correct.mean() <= result.high
    assert 0.88 <= covered / 200 <= 0.99


def test_monitor_cbpe_tracks_a_calibrated_drop():
    """Six times as many unsure answers, still calibrated: accuracy falls by about ten points
    and the mean confidence falls with it."""
    confidence, correct = calibrated(5000, np.random.default_rng(2), hard=0.3)
    result = mean_confidence(confidence)
    assert result.method == "cbpe" and result.n == 5000
    assert abs(result.accuracy - correct.mean()) < 0.02
    assert result.low < result.accuracy < result.high


def test_monitor_atc_matches_the_accuracy_of_unshifted_traffic(reference):
    confidence, correct = calibrated(5000, np.random.default_rng(3))
    result = thresholded_confidence(reference, confidence)
    assert result.method == "atc" and result.n == 5000
    assert abs(result.accuracy - correct.mean()) < 0.02
    assert result.low < result.accuracy < result.high


def test_monitor_atc_tracks_an_overconfident_drop_that_cbpe_misses(reference):
    """The shift temperature scaling does not see: 30% of the traffic is corrupted, answered
    with confidence 0.4-0.8 but right only 15% of the time. Those fall mostly below the ATC
    threshold (about 0.74 here) and count as wrong; CBPE believes their confidence."""
    rng = np.random.default_rng(4)
    confidence, correct = calibrated(5000, rng)
    corrupted = rng.random(5000) < 0.3
    confidence = np.where(corrupted, rng.uniform(0.4, 0.8, 5000), confidence)
    correct = np.where(corrupted, rng.random(5000) < 0.15, correct)
    accuracy = correct.mean()
    assert abs(thresholded_confidence(reference, confidence).accuracy - accuracy) < 0.03
    assert mean_confidence(confidence).accuracy - accuracy > 0.10


def test_monitor_atc_reproduces_the_reference_accuracy_even_with_tied_confidences():
    """Saturated confidences (exactly 1.0) cannot be split by any threshold: answers at the
    threshold count fractionally, so the reference's own estimate is its accuracy."""
    correct = np.arange(1000) >= 10  # 99% right
    confidence = np.where(np.arange(1000) < 5, 0.6, 1.0)
    reference = reference_of(confidence, correct)
    assert atc_threshold(reference) == (1.0, pytest.approx(990 / 995))
    assert thresholded_confidence(reference, confidence).accuracy == pytest.approx(0.99)
    assert thresholded_confidence(reference, np.ones(10)).accuracy == pytest.approx(990 / 995)
    assert thresholded_confidence(reference, np.full(10, 0.6)).accuracy == 0


def test_monitor_estimate_intervals_stay_inside_zero_one(reference):
    for result in (
        mean_confidence(np.ones(50)),
        thresholded_confidence(reference, np.ones(50)),
        mean_confidence(np.zeros(50)),
    ):
        assert 0 <= result.low <= result.accuracy <= result.high <= 1


def test_monitor_estimate_dispatches_by_method(reference):
    confidence, _ = calibrated(500, np.random.default_rng(5))
    assert estimate(reference, confidence, method="cbpe") == mean_confidence(confidence)
    assert estimate(reference, confidence, method="atc", level=0.9) == thresholded_confidence(
        reference, confidence, level=0.9
    )
    assert isinstance(estimate(reference, confidence), Estimate)
    assert estimate(reference, confidence).as_dict()["n"] == 500


def test_monitor_estimate_refuses_an_unknown_method(reference):
    with pytest.raises(ValueError, match=r"method: got 'mean', expected one of \('atc', 'cbpe'\)"):
        estimate(reference, np.ones(10), method="mean")


@pytest.mark.parametrize("level", [0, 1, 95, -0.5])
def test_monitor_estimate_refuses_a_level_outside_zero_one(level):
    with pytest.raises(ValueError, match=rf"level: got {level!r}, expected a number in \(0, 1\)"):
        mean_confidence(np.ones(10), level=level)


@pytest.mark.parametrize(
    "confidence", [np.array([]), np.array([0.5, 1.2]), np.array([[0.5]]), np.array([np.nan])]
)
def test_monitor_estimate_refuses_what_are_not_confidences(reference, confidence):
    with pytest.raises(ValueError, match="window_confidence: got"):
        thresholded_confidence(reference, confidence)
