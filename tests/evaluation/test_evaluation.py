"""Scores, the JSON-safe metrics, McNemar's exact test and the plot/CSV writers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.digits import synthetic_digits

from mnist_pipeline import files
from mnist_pipeline.evaluation.plots import (
    plot_class_recall_png,
    plot_confusion_png,
    plot_misclassified_grid,
    write_class_recall_csv,
    write_confusion_csv,
)
from mnist_pipeline.evaluation.scores import (
    binomial_two_sided_half,
    mcnemar_exact,
    metrics_dict,
    score,
    write_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_hot(predictions, confidence=0.91):
    """Softmax-like rows: `confidence` on the predicted class, the rest spread evenly."""
    predictions = np.asarray(predictions)
    probs = np.full((predictions.size, 10), (1 - confidence) / 9)
    probs[np.arange(predictions.size), predictions] = confidence
    return probs


def test_perfect_predictions():
    labels = np.arange(20, dtype=np.uint8) % 10
    scores = score(labels, one_hot(labels, confidence=1.0))
    assert scores.accuracy == 1.0
    assert scores.macro_f1 == 1.0
    assert scores.precision == [1.0] * 10 and scores.recall == [1.0] * 10
    assert scores.support == [2] * 10
    np.testing.assert_array_equal(scores.confusion, 2 * np.eye(10, dtype=int))
    assert scores.predictions.dtype == np.uint8
    assert scores.correct.dtype == bool and scores.correct.all()
    # Clipped at 1 - 1e-7, as Keras does: a tiny positive loss, not 0 or -0.
    assert scores.loss == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)


def test_known_confusion_matrix_and_per_class_scores():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], dtype=np.uint8)
    preds = np.array([0, 0, 1, 1, 1, 2, 2, 0, 3, 3])
    scores = score(labels, one_hot(preds))
    expected = np.zeros((10, 10), dtype=int)
    for true, pred in zip(labels, preds, strict=True):
        expected[true, pred] += 1
    np.testing.assert_array_equal(scores.confusion, expected)
    assert scores.confusion[2, 0] == 1 and scores.confusion[0, 2] == 0  # rows are true labels
    assert scores.accuracy == pytest.approx(7 / 10)
    # class 0: tp 2, predicted 3, support 3; class 2: tp 2, predicted 2, support 4
    assert scores.precision[0] == pytest.approx(2 / 3)
    assert scores.recall[0] == pytest.approx(2 / 3)
    assert scores.precision[2] == pytest.approx(1.0)
    assert scores.recall[2] == pytest.approx(0.5)
    assert scores.f1[2] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert scores.support[:4] == [3, 2, 4, 1] and scores.support[4:] == [0] * 6
    assert scores.macro_f1 == pytest.approx(sum(scores.f1) / 10)
    np.testing.assert_array_equal(scores.correct, labels == preds)
    assert scores.loss == pytest.approx(-(7 * math.log(0.91) + 3 * math.log(0.01)) / 10)


def test_never_predicted_and_absent_classes_score_zero_not_nan():
    labels = np.array([0, 1, 1, 5], dtype=np.uint8)
    preds = np.array([0, 0, 0, 0])  # class 1 and 5 never predicted; 2..4, 6..9 absent
    scores = score(labels, one_hot(preds))
    assert scores.precision[1] == 0.0 and scores.precision[5] == 0.0
    assert scores.recall[7] == 0.0 and scores.support[7] == 0
    assert scores.f1[1] == 0.0
    assert not any(math.isnan(v) for v in scores.precision + scores.recall + scores.f1)
    assert scores.precision[0] == pytest.approx(1 / 4)


def test_nan_probabilities_give_nan_loss():
    labels = np.array([0, 1, 2], dtype=np.uint8)
    probs = one_hot(labels)
    probs[1, 3] = np.nan
    scores = score(labels, probs)
    assert math.isnan(scores.loss)
    assert not math.isnan(scores.accuracy)  # accuracy follows the argmax
    probs[1, 3] = np.inf
    assert math.isnan(score(labels, probs).loss)


def test_empty_input_gives_nan_headline_metrics():
    scores = score(np.zeros(0, dtype=np.uint8), np.zeros((0, 10)))
    assert math.isnan(scores.accuracy) and math.isnan(scores.loss) and math.isnan(scores.macro_f1)
    assert scores.support == [0] * 10
    assert scores.predictions.shape == (0,) and scores.correct.shape == (0,)


@pytest.mark.parametrize(
    "labels, probs, message",
    [
        (np.zeros(3, dtype=np.uint8), np.zeros((2, 10)), "probabilities"),
        (np.zeros(3, dtype=np.uint8), np.zeros((3, 9)), "probabilities"),
        (np.zeros((3, 1), dtype=np.uint8), np.zeros((3, 10)), "labels"),
        (np.array([0.0, 1.0]), np.zeros((2, 10)), "labels"),
        (np.array([0, 10], dtype=np.uint8), np.zeros((2, 10)), "0..9"),
    ],
)
def test_shape_and_label_errors(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        score(labels, probs)


def test_metrics_dict_rounds_and_writes_strict_json(tmp_path):
    labels = np.array([0, 1, 2], dtype=np.uint8)
    metrics = metrics_dict(score(labels, one_hot([0, 1, 1])))
    assert metrics["test_accuracy"] == round(2 / 3, 6)
    assert set(metrics["per_class"]) == {str(c) for c in range(10)}
    assert metrics["per_class"]["1"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": round(2 / 3, 6),
        "support": 1,
    }

    empty = write_metrics(
        tmp_path / "m.json", score(np.zeros(0, dtype=np.uint8), np.zeros((0, 10)))
    )
    assert math.isnan(empty["test_accuracy"])  # in memory NaN stays NaN...
    text = (tmp_path / "m.json").read_text()
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    assert loaded["test_accuracy"] is None and loaded["test_loss"] is None  # ...on disk: null
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_json_safe_converts_numpy_and_non_finite():
    out = files.json_safe(
        {
            "a": np.float32(0.5),
            "b": [np.nan, np.inf],
            "c": np.int64(3),
            "d": np.array([True, False]),
            4: (1.0,),
        }
    )
    assert out == {"a": 0.5, "b": [None, None], "c": 3, "d": [True, False], "4": [1.0]}
    json.dumps(out, allow_nan=False)


def test_mcnemar_counts_and_hand_computed_p():
    a = np.array([True] * 10 + [True] * 5 + [False] * 3)
    b = np.array([False] * 10 + [True] * 5 + [False] * 3)
    assert mcnemar_exact(a, b) == (10, 0, pytest.approx(2 * 0.5**10))
    bb, cc, p = mcnemar_exact(b, a)
    assert (bb, cc) == (0, 10) and p == pytest.approx(2 * 0.5**10)
    # b=1, c=3: P(X <= 1 | n=4) = 5/16, two-sided 10/16
    a = np.array([True, False, False, False, True])
    b = np.array([False, True, True, True, True])
    assert mcnemar_exact(a, b) == (1, 3, pytest.approx(10 / 16))


def test_exact_binomial_p_matches_scipy():
    from scipy import stats

    for k, n in [
        (0, 1),
        (1, 2),
        (3, 7),
        (5, 10),
        (36, 75),
        (37, 75),
        (120, 300),
        (900, 2000),
        (4990, 10000),
        (5000, 10000),
    ]:
        expected = stats.binomtest(k, n, 0.5).pvalue
        assert binomial_two_sided_half(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    with pytest.raises(ValueError, match="k=6 of n=10"):
        binomial_two_sided_half(6, 10)


def test_mcnemar_without_disagreement_and_length_mismatch():
    same = np.array([True, False, True])
    assert mcnemar_exact(same, same) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        mcnemar_exact(same, same[:2])


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_plot_writers_produce_files_and_no_temp_files(tmp_path):
    images, labels = synthetic_digits(30)
    preds = labels.copy()
    preds[[1, 4, 7]] = (preds[[1, 4, 7]] + 1) % 10
    probs = one_hot(preds, confidence=0.83)
    scores = score(labels, probs)

    write_confusion_csv(tmp_path / "confusion.csv", labels, scores.predictions)
    plot_confusion_png(tmp_path / "confusion.png", scores.confusion)
    plot_misclassified_grid(
        tmp_path / "wrong.png", images, labels, scores.predictions, probs, limit=2
    )
    write_class_recall_csv(tmp_path / "recall.csv", scores.recall)
    plot_class_recall_png(tmp_path / "recall.png", scores.recall, threshold=0.9)

    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 31
    assert rows[2] == f"{labels[1]},{preds[1]}"
    recall_rows = (tmp_path / "recall.csv").read_text().splitlines()
    assert recall_rows[0] == "class,recall" and len(recall_rows) == 11
    assert recall_rows[1].startswith("0,")
    for name in ("confusion.png", "wrong.png", "recall.png"):
        _assert_png(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion.csv",
        "confusion.png",
        "recall.csv",
        "recall.png",
        "wrong.png",
    ]


def test_misclassified_grid_with_no_mistakes_and_bad_args(tmp_path):
    images, labels = synthetic_digits(10)
    probs = one_hot(labels)
    plot_misclassified_grid(tmp_path / "none.png", images, labels, labels, probs, 36)
    _assert_png(tmp_path / "none.png")
    with pytest.raises(ValueError, match="limit"):
        plot_misclassified_grid(tmp_path / "x.png", images, labels, labels, probs, 0)
    with pytest.raises(ValueError, match="same N"):
        plot_misclassified_grid(tmp_path / "x.png", images[:5], labels, labels, probs, 36)
    with pytest.raises(ValueError, match="same length"):
        write_confusion_csv(tmp_path / "x.csv", labels, labels[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.png"]


def test_plot_failure_leaves_previous_file_untouched(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def half_written(self, fh, **kwargs):
        fh.write(PNG_MAGIC)
        raise RuntimeError("disk full")

    target = tmp_path / "confusion.png"
    target.write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_confusion_png(target, np.eye(10, dtype=int))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]


def test_module_does_not_import_mlflow_or_keras():
    import subprocess
    import sys

    code = (
        "import sys, mnist_pipeline.evaluation.scores, mnist_pipeline.evaluation.plots, "
        "mnist_pipeline.evaluation.gate; "
        "bad = [m for m in ('mlflow', 'keras', 'tensorflow', 'matplotlib.pyplot') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
