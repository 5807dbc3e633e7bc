"""Monitoring statistics and drift tests: each test fires on a hand-made shift of what it
watches and stays quiet on fresh traffic from the reference's own distribution."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from helpers.digits import synthetic_digits

from mnist_pipeline.errors import DataError
from mnist_pipeline.monitoring import drift
from mnist_pipeline.monitoring.drift import (
    Outputs,
    Reference,
    class_mix_test,
    compare,
    ks_test,
)
from mnist_pipeline.monitoring.features import (
    INPUT_STATISTICS,
    input_statistics,
    output_statistics,
)

REFERENCE_SIZE = 10_000
WINDOW = 500


def softmax_outputs(labels: np.ndarray, strength: float = 4.0, seed: int = 0) -> np.ndarray:
    """Made-up model outputs: softmax of unit-normal logits with `strength` added to the true
    class, so most answers are right and confident, some are not."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(labels.size, 10))
    logits[np.arange(labels.size), labels] += strength
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def traffic(n: int, seed: int, transform=None, strength: float = 4.0) -> Outputs:
    images, labels = synthetic_digits(n, seed=seed)
    if transform is not None:
        images = transform(images)
    return Outputs.of(images, softmax_outputs(labels, strength, seed=seed + 1))


@pytest.fixture(scope="module")
def reference() -> Reference:
    images, labels = synthetic_digits(REFERENCE_SIZE, seed=0)
    return Reference.labelled(images, softmax_outputs(labels, seed=1), labels)


# --- hand-made shifts of the synthetic digits (a bright bar at a class-specific row) -------


def brighter_background(images: np.ndarray) -> np.ndarray:
    return np.where(images < 128, images + 60, images).astype(np.uint8)


def translated(images: np.ndarray, pixels: int = 4) -> np.ndarray:
    return np.roll(images, (pixels, pixels), axis=(1, 2))


def scaled(images: np.ndarray, factor: float = 1.5) -> np.ndarray:
    """Nearest-neighbour zoom about the centre: the bar grows taller and wider."""
    source = np.clip(np.round(13.5 + (np.arange(28) - 13.5) / factor), 0, 27).astype(int)
    return images[:, source][:, :, source]


def thicker(images: np.ndarray) -> np.ndarray:
    """One-pixel dilation of the strokes."""
    return np.maximum.reduce(
        [
            images,
            np.roll(images, 1, axis=1),
            np.roll(images, -1, axis=1),
            np.roll(images, 1, axis=2),
            np.roll(images, -1, axis=2),
        ]
    )


# --- features --------------------------------------------------------------------------------


def test_monitor_input_statistics_of_a_blank_image():
    blank = input_statistics(np.zeros((1, 28, 28), np.uint8))[0]
    stats = dict(zip(INPUT_STATISTICS, blank, strict=True))
    assert stats == {
        "ink": 0,
        "mean": 0,
        "contrast": 0,
        "height": 0,
        "width": 0,
        "row_centre": 13.5,
        "col_centre": 13.5,
    }


def test_monitor_input_statistics_of_a_rectangle():
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, 5:8, 10:15] = 255  # 3 rows x 5 columns: 15 of 784 pixels
    stats = dict(zip(INPUT_STATISTICS, input_statistics(image)[0].tolist(), strict=True))
    fraction = 15 / 784
    assert stats["ink"] == pytest.approx(fraction)
    assert stats["mean"] == pytest.approx(fraction)
    assert stats["contrast"] == pytest.approx(math.sqrt(fraction * (1 - fraction)))
    assert (stats["height"], stats["width"]) == (3, 5)
    assert (stats["row_centre"], stats["col_centre"]) == (6.0, 12.0)


def test_monitor_input_statistics_weigh_grey_pixels_but_draw_the_box_around_strokes():
    image = np.zeros((2, 28, 28), np.uint8)
    image[:, 0, 0] = 100  # grey: mass for the centre, but not stroke
    image[:, 20, 20] = 200
    stats = input_statistics(image)
    assert stats.dtype == np.float32 and stats.shape == (2, 7)
    assert stats[0, 0] == pytest.approx(1 / 784)
    assert tuple(stats[0, 3:5]) == (1, 1)
    assert stats[0, 5] == pytest.approx(20 * 200 / 300)
    assert np.array_equal(stats[0], stats[1])


def test_monitor_input_statistics_match_a_plain_computation_on_many_images():
    images, _ = synthetic_digits(300, seed=3)
    stats = input_statistics(images).astype(np.float64)
    pixels = images.reshape(300, -1).astype(np.float64)
    assert np.allclose(stats[:, 0], (pixels >= 128).mean(axis=1))
    assert np.allclose(stats[:, 1], pixels.mean(axis=1) / 255, atol=1e-6)
    assert np.allclose(stats[:, 2], pixels.std(axis=1) / 255, atol=1e-6)
    rows = images.astype(np.float64).sum(axis=2) @ np.arange(28) / pixels.sum(axis=1)
    assert np.allclose(stats[:, 5], rows, atol=1e-4)


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 28, 27), np.uint8),
        np.zeros((28, 28), np.uint8),
        np.zeros((2, 28, 28), np.float32),
    ],
)
def test_monitor_input_statistics_refuse_what_is_not_raw_mnist(images):
    with pytest.raises(ValueError, match=r"images: got shape .* dtype .*, expected .*uint8"):
        input_statistics(images)


def test_monitor_output_statistics_of_known_probabilities():
    probabilities = np.zeros((3, 10))
    probabilities[0] = 0.1  # uniform
    probabilities[1, 7] = 1.0  # one-hot
    probabilities[2, [2, 5]] = [0.25, 0.75]
    predicted, confidence, entropy = output_statistics(probabilities)
    assert predicted.dtype == np.int64 and predicted[1:].tolist() == [7, 5]
    assert confidence.dtype == np.float32 and entropy.dtype == np.float32
    assert confidence.tolist() == pytest.approx([0.1, 1.0, 0.75])
    assert entropy[0] == pytest.approx(math.log(10), rel=1e-6)
    assert entropy[1] == 0
    assert entropy[2] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_monitor_output_statistics_refuse_a_flat_array():
    with pytest.raises(ValueError, match=r"probabilities: got shape \(10,\)"):
        output_statistics(np.full(10, 0.1))


# --- Outputs and Reference -------------------------------------------------------------------


def test_monitor_outputs_name_the_field_whose_length_differs():
    with pytest.raises(ValueError, match="confidence: got 4 rows, expected 5"):
        Outputs(
            predicted=np.zeros(5, int),
            confidence=np.zeros(4),
            entropy=np.zeros(5),
            inputs=np.zeros((5, 7)),
        )


def test_drift_reference_round_trips_through_a_file(tmp_path, reference):
    path = tmp_path / "monitor" / "reference.npz"
    reference.save(path)
    loaded = Reference.load(path)
    for name in ("predicted", "confidence", "entropy", "inputs", "correct"):
        assert np.array_equal(getattr(loaded, name), getattr(reference, name)), name
    assert loaded.accuracy == reference.accuracy
    assert [p.name for p in tmp_path.joinpath("monitor").iterdir()] == ["reference.npz"]


def test_drift_reference_load_names_the_file_and_the_missing_key(tmp_path, reference):
    path = tmp_path / "reference.npz"
    arrays = {
        name: getattr(reference, name) for name in ("predicted", "confidence", "entropy", "inputs")
    }
    np.savez(path, format=drift.FORMAT, statistics=np.array(INPUT_STATISTICS), **arrays)
    with pytest.raises(DataError, match=rf"{path}: missing key 'correct'"):
        Reference.load(path)


def test_drift_reference_load_refuses_another_format_and_a_missing_file(tmp_path, reference):
    path = tmp_path / "reference.npz"
    reference.save(path)
    arrays = dict(np.load(path))
    arrays["format"] = np.int64(drift.FORMAT + 1)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"{path}: key 'format' is {drift.FORMAT + 1}"):
        Reference.load(path)
    with pytest.raises(DataError, match="nowhere.npz: not found"):
        Reference.load(tmp_path / "nowhere.npz")


# --- each test on a hand-made shift, and on none ---------------------------------------------


def test_drift_class_mix_fires_on_a_hand_made_shift():
    reference = np.arange(REFERENCE_SIZE) % 10  # every class a tenth
    counts = np.full(10, 50)
    counts[3] = 100  # class 3 asked twice as often: 2/11 of the window, the others 1/11
    test = class_mix_test(reference, np.repeat(np.arange(10), counts))
    # p is about 2e-5: below the per-test level at the default alpha (0.001 over 10 tests)
    assert test.name == "class_mix" and test.p_value < drift.DEFAULT_ALPHA / 10
    # total variation distance: half of 9 * (1/10 - 1/11) + (2/11 - 1/10)
    assert test.shift == pytest.approx(9 / 110)


def test_drift_class_mix_is_quiet_without_a_shift():
    rng = np.random.default_rng(1)
    test = class_mix_test(rng.integers(0, 10, REFERENCE_SIZE), rng.integers(0, 10, WINDOW))
    assert test.p_value > 0.01 and test.shift < 0.05


def test_drift_class_mix_ignores_classes_never_predicted():
    reference = np.repeat([0, 1, 2], 100)
    assert class_mix_test(reference, np.repeat([0, 1, 2], 10)).p_value == pytest.approx(1)
    assert class_mix_test(np.zeros(50, int), np.zeros(30, int)).p_value == 1


def test_drift_confidence_and_entropy_fire_when_the_model_grows_unsure(reference):
    unsure = traffic(WINDOW, seed=11, strength=2.5)
    for name, values, sign in (("confidence", "confidence", -1), ("entropy", "entropy", 1)):
        test = ks_test(name, getattr(reference, values), getattr(unsure, values))
        assert test.p_value < 1e-6, name
        assert np.sign(test.shift) == sign, name


def test_drift_entropy_fires_alone_when_the_doubt_spreads_over_more_classes():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.5, 0.99, (2, REFERENCE_SIZE))
    focused = np.zeros((REFERENCE_SIZE, 10))
    focused[:, 0], focused[:, 1] = confidence[0], 1 - confidence[0]  # doubt on one class
    spread = np.zeros((WINDOW, 10))
    spread[:, 0] = confidence[1, :WINDOW]
    spread[:, 1:] = (1 - confidence[1, :WINDOW, None]) / 9  # the same doubt over nine
    _, reference_confidence, reference_entropy = output_statistics(focused)
    _, window_confidence, window_entropy = output_statistics(spread)
    assert ks_test("entropy", reference_entropy, window_entropy).p_value < 1e-6
    assert ks_test("confidence", reference_confidence, window_confidence).p_value > 0.01


@pytest.mark.parametrize(
    ("transform", "watched"),
    [
        (brighter_background, ("input:mean", "input:contrast")),
        (translated, ("input:row_centre", "input:col_centre")),
        (scaled, ("input:height", "input:width")),
        (thicker, ("input:ink",)),
    ],
    ids=["brighter", "translated", "scaled", "thicker"],
)
def test_drift_input_statistics_fire_on_a_hand_made_shift(reference, transform, watched):
    window = traffic(WINDOW, seed=12, transform=transform)
    result = compare(reference, window)
    tests = {test.name: test for test in result.tests}
    for name in watched:
        assert tests[name].fired and tests[name].p_value < 1e-6, (name, tests[name])
    assert result.alarm and set(watched) <= set(result.fired)
    # Each moves at least one statistic for more than 40% of the traffic: still an alarm
    # with the floor that keeps windows of real, clean MNIST quiet.
    assert compare(reference, window, min_distance=0.4).alarm


def test_drift_min_distance_silences_a_significant_but_small_shift():
    """A tenth of a standard deviation more ink: KS with 10,000 against 500 calls it
    significant, though only about 14% of the traffic moved."""
    rng = np.random.default_rng(5)

    def outputs(n: int, ink_shift: float) -> Outputs:
        inputs = rng.normal(size=(n, len(INPUT_STATISTICS)))
        inputs[:, 0] += ink_shift
        return Outputs(
            predicted=np.arange(n) % 10,
            confidence=rng.uniform(0.9, 1, n),
            entropy=rng.uniform(0, 0.3, n),
            inputs=inputs,
        )

    reference, window = outputs(REFERENCE_SIZE, 0.0), outputs(WINDOW, 0.35)
    plain = compare(reference, window)
    ink = next(test for test in plain.tests if test.name == "input:ink")
    assert plain.fired == ("input:ink",) and ink.statistic < 0.3
    floored = compare(reference, window, min_distance=0.3)
    assert not floored.alarm and floored.min_distance == 0.3
    assert floored.as_dict()["min_distance"] == 0.3


def test_drift_compare_is_quiet_on_fresh_traffic_from_the_same_source(reference):
    result = compare(reference, traffic(WINDOW, seed=13))
    assert not result.alarm and result.fired == ()
    names = [test.name for test in result.tests]
    assert names == [
        "class_mix",
        "confidence",
        "entropy",
        *(f"input:{stat}" for stat in INPUT_STATISTICS),
    ]
    assert result.level == pytest.approx(result.alpha / len(names))
    assert min(test.p_value for test in result.tests) > result.level
    json.dumps(result.as_dict(), allow_nan=False)


def test_drift_false_alarms_stay_within_alpha_over_many_clean_windows(reference):
    """200 fresh windows of 500, none from the reference itself: at alpha = 0.001 about
    0.2 alarms are expected; more than 2% would make the monitor noise."""
    windows = traffic(200 * WINDOW, seed=14)
    alarms = sum(
        compare(reference, windows.take(slice(i, i + WINDOW))).alarm
        for i in range(0, len(windows), WINDOW)
    )
    assert alarms <= 4


def test_drift_ks_on_constants_neither_warns_nor_returns_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = ks_test("input:height", np.zeros(100), np.zeros(30))
        moved = ks_test("input:height", np.zeros(100), np.ones(30))
    assert (same.statistic, same.p_value, same.shift) == (0, 1, 0)
    assert moved.statistic == 1 and moved.p_value < 1e-6 and moved.shift == 1


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, math.nan, True, "0.01"])
def test_drift_compare_refuses_alpha_outside_zero_one(reference, alpha):
    with pytest.raises(ValueError, match=r"alpha: got .*, expected a number in \(0, 1\)"):
        compare(reference, traffic(WINDOW, seed=15), alpha=alpha)


@pytest.mark.parametrize("min_distance", [-0.1, 1, 2, True])
def test_drift_compare_refuses_min_distance_outside_zero_one(reference, min_distance):
    with pytest.raises(ValueError, match=r"min_distance: got .*, expected a number in \[0, 1\)"):
        compare(reference, traffic(WINDOW, seed=15), min_distance=min_distance)


def test_drift_compare_refuses_a_window_too_small_to_test(reference):
    with pytest.raises(ValueError, match="window: got 19 requests, expected at least 20"):
        compare(reference, traffic(19, seed=16))


def test_drift_ks_refuses_an_empty_sample():
    with pytest.raises(ValueError, match=r"confidence: window_values: got shape \(0,\)"):
        ks_test("confidence", np.ones(10), np.ones(0))
