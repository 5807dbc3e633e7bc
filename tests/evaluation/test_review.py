"""`mnist-pipeline review`: on a throwaway git + DVC repository whose main branch ran the
pipeline, two experiments, and a report for each against main (real DVC, tiny data)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import repo
from helpers.markdown import tight_tables

from mnist_pipeline.evaluation import review


def test_nested_metrics_fold_away_and_unchanged_ones_are_counted():
    """On `dvc metrics diff --all` JSON: headline metrics always in view, changed nested ones
    folded, unchanged nested ones counted per file, the verdict's file left out."""
    diff = {
        "metrics/evaluate.json": {
            "test_accuracy": {"old": 0.95, "new": 0.95, "diff": 0},
            "per_class.3.recall": {"old": 0.9, "new": 0.93, "diff": 0.03},
            "per_class.4.recall": {"old": 0.9, "new": 0.9, "diff": 0},
        },
        "metrics/data.json": {"test.count": {"old": 10000, "new": 10000, "diff": 0}},
        "gate.json": {"p_value": {"old": 0.1, "new": 0.01}},
    }
    text = tight_tables("\n".join(review._metrics_section(diff, "gate.json")))
    headline, folded = text.split("<details>")
    assert "| `test_accuracy` | 0.9500 | 0.9500 | +0.0000 | metrics/evaluate.json |" in headline
    assert "| `per_class.3.recall` | 0.9000 | 0.9300 | +0.0300 |" in folded
    assert "1 more changed metrics" in folded and "per_class.4" not in text
    assert "Unchanged: 1 in `metrics/data.json`, 1 in `metrics/evaluate.json`." in text
    assert "p_value" not in text


def _review(path, *args: str):
    return repo.run(repo.python("-m", "mnist_pipeline.cli", "review", *args), path, check=False)


@pytest.mark.slow
def test_review_reports_params_metrics_verdict_and_plots_per_experiment(tmp_path):
    path = repo.make(tmp_path / "repo", store=True)
    repo.run(["dvc", "repro"], path)
    repo.run(["git", "add", "-A"], path)
    repo.run(["git", "commit", "-qm", "baseline results"], path)
    baseline = json.loads((path / "metrics/evaluate.json").read_text())["test_accuracy"]
    repo.run(["dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1"], path)
    repo.run(["dvc", "exp", "run", "-n", "slow-sgd", "-S", "optimizer.learning_rate=0.001"], path)

    done = _review(path, "--exp", "one-epoch", "--against", "main", "-o", "review.md")
    assert done.returncode == 0, done.stderr
    assert "mnist-pipeline: wrote review.md" in done.stdout
    text = tight_tables((path / "review.md").read_text())
    assert text.startswith("## Review: experiment `one-epoch` against `main`\n")
    params = text.split("### Params that changed")[1].split("###")[0]
    assert "| `train.epochs` | 2 | 1 |" in params
    assert "learning_rate" not in params  # only what this experiment changed
    row = re.search(
        r"\| `test_accuracy` \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \| "
        r"metrics/evaluate.json \|",
        text,
    )
    assert row, text
    before, after, delta = map(float, row.groups())
    assert before == pytest.approx(baseline, abs=1e-4)
    assert delta == pytest.approx(after - before, abs=2e-4)
    assert re.search(r"Unchanged: \d+ in `metrics/data.json`", text)  # the same data
    gate = text.split("### Gate verdict")[1].split("###")[0]
    assert re.search(r"- Experiment `one-epoch`: \*\*(PASSED|REJECTED)\*\* v\d+: \S", gate)
    assert "- `main`: **PASSED** v1: passed all 7 rules (no champion yet)" in gate
    plots = text.split("### Plots")[1]
    for plot in (
        "plots/train_history.csv",
        "plots/evaluate/confusion.csv",
        "plots/evaluate/confusion.png",
        "plots/evaluate/class_recall.png",
    ):
        assert f"- `{plot}`" in plots
    assert "`dvc plots diff main one-epoch`" in plots

    # The other experiment, to stdout; and the workspace (it holds the last experiment run).
    other = _review(path, "--exp", "slow-sgd")
    assert "| `optimizer.learning_rate` | 0.05 | 0.001 |" in tight_tables(other.stdout), (
        other.stdout
    )
    assert "train.epochs" not in other.stdout.split("### Metrics")[0]
    workspace = _review(path)
    assert workspace.stdout.startswith("## Review: the workspace against `main`")
    assert "| `optimizer.learning_rate` | 0.05 | 0.001 |" in tight_tables(workspace.stdout)

    missing = _review(path, "--exp", "no-such-experiment")
    assert missing.returncode == 1
    first = missing.stderr.splitlines()[0]
    assert first.startswith(
        "mnist-pipeline: error: dvc params diff main no-such-experiment failed in "
    ) and first.endswith("see: dvc exp list)")
