"""The model card: Wilson intervals against published values, the card's contents, and an HTML
page that needs nothing outside itself."""

from __future__ import annotations

import base64
import math
import re

import numpy as np
import pytest

from mnist_pipeline.evaluation import card, plots, reuse
from mnist_pipeline.evaluation.robustness import Shift
from mnist_pipeline.evaluation.scores import score, wilson_interval
from mnist_pipeline.training.calibration import Calibration

from helpers.markdown import tight_tables


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in
# Medicine 17:857-872, Table I, method 3 (score interval without continuity correction).
@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_published_values(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges():
    low, high = wilson_interval(10, 10)
    assert (low, high) == pytest.approx((0.7225, 1.0), abs=5e-5)  # not empty at p = 1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    # Symmetric: k successes and k failures mirror each other.
    a, b = wilson_interval(3, 40)
    c, d = wilson_interval(37, 40)
    assert (a, b) == pytest.approx((1 - d, 1 - c))
    with pytest.raises(ValueError, match="expected 0 <= successes <= trials"):
        wilson_interval(5, 4)


FITTED = Calibration(
    temperature=0.5,
    threshold=0.9,
    target_selective_accuracy=0.999,
    val_images=5000,
    val_sha256="v" * 64,
    val_nll_before=0.3,
    val_nll_after=0.2,
    val_ece_before=0.08,
    val_ece_after=0.004,
    val_coverage=0.97,
)


def _shift(labels: np.ndarray, probabilities: np.ndarray) -> Shift:
    """Two corruptions: `fog` loses every eight and five, `translate` nothing."""
    fogged = probabilities.copy()
    hit = np.isin(labels, (5, 8))
    fogged[hit] = 0.1
    fogged[hit, 0] = 0.1 + 1e-3  # a wrong, unsure answer
    return Shift.measure(
        probabilities,
        np.stack([fogged, probabilities]),
        labels,
        ["fog", "translate"],
        "s" * 64,
        FITTED,
    )


def _facts(tmp_path, passed: bool = True, params: dict | None = None) -> card.Facts:
    labels = np.repeat(np.arange(10), 50).astype(np.uint8)
    probabilities = np.full((500, 10), 0.01, np.float32)
    predicted = labels.copy()
    predicted[np.flatnonzero(labels == 8)[:15]] = 3  # eights are the weak spot
    predicted[np.flatnonzero(labels == 5)[:2]] = 6
    probabilities[np.arange(500), predicted] = 0.91
    scores = score(labels, probabilities)
    plots.plot_confusion_png(tmp_path / "confusion.png", scores.confusion)
    plots.plot_class_recall_png(tmp_path / "class_recall.png", scores.recall)
    verdict = {
        "passed": passed,
        "p_value": 0.0123,
        "reason": "beats champion v1 by +0.0100 (p=0.0123 < 0.05)"
        if passed
        else "min_accuracy: 0.9700 < 0.9800",
        "rules": [
            {
                "name": "min_accuracy",
                "passed": passed,
                "value": 0.97,
                "threshold": 0.95 if passed else 0.98,
                "detail": "0.9700 >= 0.9500",
            },
            {
                "name": "test_data_matches_training",
                "passed": True,
                "value": "a" * 64,
                "threshold": "a" * 64,
                "detail": "matches <the training run's>",
            },
        ],
    }
    return card.Facts(
        registered_model="mnist-classifier",
        version="3",
        run_id="abc123",
        params=params
        or {
            "model.name": "cnn",
            "optimizer.learning_rate": "0.001",
            "train.epochs": "5",
            "runtime.precision": "float32",
        },
        tags={
            "data.sha256": "d" * 64,
            "data.test_sha256": "t" * 64,
            "mlflow.source.git.commit": "c0ffee",
            "git.dirty": "true",
            "dvc.experiment": "wider-cnn",
            "dvc.dep.data/processed": "f00d.dir",
        },
        scores=scores,
        shift=_shift(labels, probabilities),
        champion_corrupted={"fog": 0.9, "translate": 0.95},
        budget=reuse.budget([False, True], 0.05),
        served_bytes=729_641,
        int8_bytes=205_810,
        test_sha256="t" * 64,
        verdict=verdict,
        champion_before="1",
        champion_after="3" if passed else "1",
        pictures={
            "Confusion matrix (test set)": tmp_path / "confusion.png",
            "Recall per class (test set)": tmp_path / "class_recall.png",
        },
    )


def test_the_card_says_what_the_model_is_saw_scores_and_is_for(tmp_path):
    md_path, html_path = card.write(tmp_path, _facts(tmp_path))
    text = tight_tables(md_path.read_text())
    assert text.startswith("# Model card: mnist-classifier v3\n")
    for needle in (
        "| model.name | cnn |",
        "| optimizer.learning_rate | 0.001 |",
        "| train.epochs | 5 |",
        "| git commit | c0ffee (with uncommitted changes) |",
        "| DVC experiment | wider-cnn |",
        "| dvc.lock md5 of data/processed | f00d.dir |",
        f"| dataset SHA-256 (train, val, test) | {'d' * 64} |",
        "PASSED: beats champion v1 by +0.0100",
        "Significance test p-value: 0.0123",
        "| test_data_matches_training | yes | aaaaaaaaaaaa… |",
        "centred 28x28 greyscale",
        "mnist-predict",
        "![Confusion matrix (test set)](confusion.png)",
    ):
        assert needle in text, needle
    assert "runtime.precision" not in text  # only the model, optimizer and train sections
    # Accuracy 483/500 with its Wilson interval; class 8 (35/50) first among the weakest.
    low, high = wilson_interval(483, 500)
    assert f"Accuracy 0.9660 (95% CI {low:.4f}–{high:.4f}, Wilson" in text
    eight_low, eight_high = wilson_interval(35, 50)
    assert f"| 8 | 0.7000 | {eight_low:.4f}–{eight_high:.4f} | 50 |" in text
    assert (
        "(the weakest classes on the test set): 8 (recall 0.7000, 15 of 50 missed), "
        "5 (recall 0.9600, 2 of 50 missed). The test set"
    ) in text


def test_the_html_card_is_self_contained(tmp_path):
    _, html_path = card.write(tmp_path, _facts(tmp_path, passed=False))
    page = html_path.read_text()
    assert "<title>Model card: mnist-classifier v3</title>" in page
    assert "REJECTED: min_accuracy: 0.9700 &lt; 0.9800" in page
    assert "&lt;the training run&#x27;s&gt;" in page  # text is escaped, not markup
    # Nothing is fetched from elsewhere: no scripts, links, stylesheets or remote pictures.
    assert not re.search(r"<script|<link|<iframe|href=|url\(|@import", page, re.IGNORECASE)
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == 2
    for source, name in zip(sources, ("confusion.png", "class_recall.png"), strict=True):
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]) == (tmp_path / name).read_bytes()


def test_the_card_reports_corrupted_suite_calibration_and_abstention(tmp_path):
    params = {
        "model.name": "cnn",
        "train.augment": "True",
        "train.augmentation.rotate": "0.05",
        "train.augmentation.noise": "0.2",
        "train.augmentation.blur": "0.0",
    }
    md_path, _ = card.write(tmp_path, _facts(tmp_path, params=params))
    text = tight_tables(md_path.read_text())
    # fog: 400 of 500 right (the 100 fives and eights lost); translate: as clean (483).
    assert "## Robustness: the corrupted test suite" in text
    assert "Mean corruption accuracy 0.8830 (the champion before this evaluation: 0.9250)" in text
    assert "worst: fog (0.8000)" in text
    assert "| fog | 0.8000 | 0.9000 | -0.1000 |" in text
    assert "| translate | 0.9660 | 0.9500 | +0.0160 |" in text
    assert "## Calibration" in text and "Temperature 0.5, fitted on the 5000 validation" in text
    assert "| clean test set |" in text and "| corrupted suite |" in text
    assert "## Abstention" in text and "below 0.9000 are marked unsure" in text
    assert "rotate 0.05 resembles rotate; noise 0.2 resembles shot noise and impulse noise" in text
    assert "blur" not in text.split("Training augmented")[1].split(".")[0]  # 0: not used
    assert "None of the suite's corruption functions or images was used in training" in text
    assert "## What is served" in text and "ONNX export (0.73 MB)" in text
    assert "Its int8 graph (0.21 MB) is what `make serve ARGS=--int8` runs" in text
    assert "weakest on fog (0.800), translate (0.966)" in text


def test_the_card_without_augmentation_or_calibration_says_so(tmp_path):
    facts = _facts(tmp_path)
    from dataclasses import replace

    from mnist_pipeline.training.calibration import IDENTITY

    labels = np.repeat(np.arange(10), 50).astype(np.uint8)
    bare = Shift.measure(
        np.eye(10)[labels], np.stack([np.eye(10)[labels]]), labels, ["fog"], "s" * 64, IDENTITY
    )
    text = tight_tables(
        card.markdown(card.build(replace(facts, shift=bare, champion_corrupted=None)))
    )
    assert "Training used no augmentation" in text
    assert "No calibration was fitted for this model" in text
    assert "No abstention threshold: every answer stands." in text
    no_int8 = card.markdown(card.build(replace(facts, int8_bytes=None)))
    assert "ONNX export (0.73 MB)" in no_int8 and "int8" not in no_int8
    assert "| fog | 1.0000 |  |  |" in text
