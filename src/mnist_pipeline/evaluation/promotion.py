"""Evaluate a trained model on the official test set, gate it, register it, maybe promote it.

The measuring (`evaluation`) and deciding (`gate`) are pure; this module is the edge where
they meet the model file, the MLflow run and the Model Registry. The read-compare-move of
the `champion` alias happens under a lock, so parallel evaluations (queued experiments)
can never leave a worse model as champion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EvaluateConfig, GateConfig, PathsConfig, TrackingConfig
from ..data.splits import Split, load_split
from ..errors import DataError, PipelineError
from ..files import sha256_file, write_json
from ..tracking import champion_record, history, locks, logged_models, registry, runs, store
from ..training import models
from ..training.fit import predict
from . import card, gate, plots
from .scores import Scores, score, write_metrics

CONFUSION_CSV = "confusion.csv"
CLASS_RECALL_CSV = "class_recall.csv"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"
CLASS_RECALL_PNG = "class_recall.png"


@dataclass
class Decision:
    verdict: gate.Verdict
    version: str
    champion_before: str | None
    champion_after: str | None
    scores: Scores
    line: str


def read_run_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (run the train stage first: dvc repro train)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rerun: dvc repro train") from None
    missing = [k for k in ("run_id", "model_uri") if not run.get(k)]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; rerun: dvc repro train")
    return run


def measure(model: Any, test: Split, cfg: EvaluateConfig) -> tuple[np.ndarray, Scores]:
    probabilities = predict(model, test.images, batch_size=cfg.batch_size)
    return probabilities, score(test.labels, probabilities)


def write_reports(paths: PathsConfig, test: Split, probabilities: np.ndarray,
                  scores: Scores, cfg: EvaluateConfig) -> dict[str, Any]:
    """The stage's DVC metrics and plots; returns the metrics dict."""
    folder = Path(paths.eval_plots)
    metrics = write_metrics(paths.eval_metrics, scores)
    plots.write_confusion_csv(folder / CONFUSION_CSV, test.labels, scores.predictions)
    plots.write_class_recall_csv(folder / CLASS_RECALL_CSV, scores.recall)
    plots.plot_confusion_png(folder / CONFUSION_PNG, scores.confusion)
    plots.plot_misclassified_grid(folder / MISCLASSIFIED_PNG, test.images, test.labels,
                                  scores.predictions, probabilities, cfg.misclassified_grid)
    plots.plot_class_recall_png(folder / CLASS_RECALL_PNG, scores.recall)
    return metrics


def log_to_run(run_id: str, scores: Scores, paths: PathsConfig) -> None:
    """The same measurements on the training run, under `evaluation/`."""
    flat = {"test_accuracy": scores.accuracy, "test_loss": scores.loss,
            "test_macro_f1": scores.macro_f1}
    for cls in range(len(scores.recall)):
        flat[f"test_recall_{cls}"] = scores.recall[cls]
        flat[f"test_precision_{cls}"] = scores.precision[cls]
    runs.log_metrics(flat, run_id=run_id)
    folder = Path(paths.eval_plots)
    for name in (CONFUSION_PNG, MISCLASSIFIED_PNG, CLASS_RECALL_PNG, CONFUSION_CSV):
        runs.log_artifact(folder / name, "evaluation", run_id=run_id)


def smoke_test(model_uri: str, images: np.ndarray, keras_probabilities: np.ndarray) -> tuple[bool | None, str]:
    """Load the logged model as pyfunc and check it predicts what the Keras model does."""
    try:
        pyfunc = logged_models.load_pyfunc(model_uri)
        served = np.asarray(pyfunc.predict(images), dtype=np.float32)
    except (PipelineError, OSError, ValueError, RuntimeError) as err:
        return None, f"could not load/predict {model_uri} as pyfunc: {err}"
    if served.shape != keras_probabilities.shape:
        return False, f"pyfunc output shape {served.shape} != Keras {keras_probabilities.shape}"
    same_labels = np.array_equal(served.argmax(1), keras_probabilities.argmax(1))
    close = np.allclose(served, keras_probabilities, atol=1e-4)
    if same_labels and close:
        return True, f"pyfunc predictions equal Keras on {len(images)} test images"
    worst = float(np.max(np.abs(served - keras_probabilities)))
    return False, f"pyfunc predictions differ from Keras (max |diff| {worst:.3g})"


def champion_on(name: str, test: Split, cfg: EvaluateConfig) -> gate.Champion | None:
    """The current champion re-scored on `test`, or None when there is none."""
    version = registry.champion(name)
    if version is None:
        return None
    model = logged_models.load_keras(registry.version_uri(name, version.version))
    _, scores = measure(model, test, cfg)
    return gate.Champion(version=str(version.version), accuracy=scores.accuracy,
                         correct=scores.correct, test_sha256=test.sha256())


def evaluate(paths: PathsConfig, eval_cfg: EvaluateConfig, gate_cfg: GateConfig,
             tracking_cfg: TrackingConfig) -> Decision:
    """Measure `paths.model` on the test set, run the gate, register and maybe promote."""
    model = models.load(paths.model)  # safe mode: no code from the file runs
    run = read_run_file(paths.run)
    test = load_split(paths.processed, "test")
    probabilities, scores = measure(model, test, eval_cfg)
    write_reports(paths, test, probabilities, scores, eval_cfg)

    store.connect(tracking_cfg)
    training_run = runs.run_info(run["run_id"], named_in=str(paths.run))
    trained_tags = training_run.data.tags
    log_to_run(run["run_id"], scores, paths)
    matches, smoke_detail = smoke_test(run["model_uri"], test.images, probabilities)
    candidate = gate.Candidate(
        accuracy=scores.accuracy, loss=scores.loss, class_recall=list(scores.recall),
        n_test=len(test), test_sha256=test.sha256(),
        trained_test_sha256=trained_tags.get("data.test_sha256"), correct=scores.correct,
        pyfunc_matches_keras=matches, smoke_detail=smoke_detail)

    name = tracking_cfg.registered_model
    model_sha = sha256_file(paths.model)
    with locks.held("registry", locks.lock_url(tracking_cfg.lock_url)) as lock:
        existing = registry.find_version(name, "model_sha256", model_sha)
        version = existing or registry.register(run["model_uri"], name, tags={
            "model_sha256": model_sha, "run_id": run["run_id"],
            "data.sha256": trained_tags.get("data.sha256", ""),
            "data.test_sha256": candidate.test_sha256,
            "git.commit": trained_tags.get(runs.GIT_COMMIT, "none")})
        version_id = str(version.version)
        current = registry.champion(name)
        champion_before = str(current.version) if current else None
        reigning = champion_before == version_id
        if reigning:
            # Re-evaluating the champion itself: only the absolute rules apply.
            champion = None
        else:
            champion = champion_on(name, test, eval_cfg) if current else None
        withdrawn = version.tags.get(registry.WITHDRAWN, "")
        verdict = gate.decide(dataclasses.replace(candidate, withdrawn=withdrawn), champion,
                              gate_cfg, reigning=reigning)
        registry.set_version_tags(name, version_id, {
            "gate.passed": str(verdict.passed).lower(), "gate.reason": verdict.reason[:4000],
            "test_accuracy": f"{scores.accuracy:.6f}", "test_loss": f"{scores.loss:.6f}",
            "test_macro_f1": f"{scores.macro_f1:.6f}"})
        if verdict.passed and not reigning:
            lock.check()  # the decision stands only while no one else can move the alias
            registry.promote(name, version_id)
        champion_after = version_id if verdict.passed else champion_before
        decided = verdict.to_dict()
        # Under the same lock: concurrent gates get distinct numbers in decision order.
        history.append(name, history.gate_entry(
            decided, candidate=version_id, champion_before=champion_before,
            champion_after=champion_after, run_id=run["run_id"]))

    report = {**decided, "candidate_version": version_id,
              "champion_version_before": champion_before, "champion_version": champion_after,
              "registered_model": name, "run_id": run["run_id"],
              "registered_now": existing is None,
              # What DVC saw of the champion for this run: the champion stage keeps it while
              # the champion is still `champion_version`, so this decision reruns nothing.
              "champion_record": champion_record.read(paths.champion)}
    write_json(paths.gate, report)
    folder = Path(paths.eval_plots)
    for written in card.write(folder, card.Facts(
            registered_model=name, version=version_id, run_id=run["run_id"],
            params=training_run.data.params, tags=trained_tags, scores=scores,
            test_sha256=candidate.test_sha256, verdict=decided,
            champion_before=champion_before, champion_after=champion_after,
            pictures={"Confusion matrix (test set)": folder / CONFUSION_PNG,
                      "Recall per class (test set)": folder / CLASS_RECALL_PNG})):
        runs.log_artifact(written, "evaluation", run_id=run["run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "gate.json"
        write_json(copy, report)
        runs.log_artifact(copy, "evaluation", run_id=run["run_id"])
    runs.set_tags({"gate.passed": str(verdict.passed).lower(),
                   "registered_version": version_id}, run_id=run["run_id"])
    line = gate.summary_line(verdict, version_id, champion_before)
    return Decision(verdict=verdict, version=version_id, champion_before=champion_before,
                    champion_after=champion_after, scores=scores, line=line)
