"""Evaluate a trained model on the official test set and the corrupted suite, gate it,
register it, maybe promote it.

The measuring (`scores`, `robustness`) and deciding (`gate`, `reuse`) are pure; this module is
the edge where they meet the model file, the MLflow run and the Model Registry. The
read-compare-move of the `champion` alias happens under a lock, so parallel evaluations
(queued experiments) can never leave a worse model as champion, and the decisions on one
test set are counted in the order they were made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import EvaluateConfig, GateConfig, PathsConfig, TrackingConfig
from ..data import suite
from ..data.splits import Split, load_split, write_npz
from ..errors import DataError, PipelineError, PromotionError
from ..files import sha256_file, tree_sha256, write_json
from ..monitoring.drift import Reference
from ..tracking import (
    champion_record,
    history,
    locks,
    logged_models,
    mnist_onnx,
    registry,
    runs,
    store,
)
from ..training import calibration, models
from ..training.fit import predict
from . import card, gate, plots, reuse
from .robustness import Shift
from .scores import Scores, metrics_dict, score

CONFUSION_CSV = "confusion.csv"
CLASS_RECALL_CSV = "class_recall.csv"
CONFUSION_PNG = "confusion.png"
MISCLASSIFIED_PNG = "misclassified.png"
CLASS_RECALL_PNG = "class_recall.png"
CORRUPTION_CSV = "corruption_accuracy.csv"
CORRUPTION_PNG = "corruption_accuracy.png"
RELIABILITY_CSV = "reliability.csv"
RELIABILITY_PNG = "reliability.png"
# Each evaluation's per-image results, on its run: the next gate reads the champion's
# corrupted-suite results from here instead of scoring it again, and they are the reference
# (calibrated outputs on the clean test set) that production traffic is compared with.
OUTCOMES = "outcomes.npz"
# Set (to the seconds to wait), a checkout leaves the decision to the team's gate service.
GATE_SERVICE_ENV = "MNIST_PIPELINE_GATE_SERVICE"
VERDICT_TAG = "gate.verdict"  # the gate service's decision on a version, written last
DIGEST_TAG = registry.APPROVED_DIGEST  # the approved model's files (files.tree_sha256)
# A version's recorded per-image results on a corrupted suite, or None.
Records = Callable[[str, str, list[str]], "np.ndarray | None"]


@dataclass
class Decision:
    verdict: gate.Verdict
    version: str
    champion_before: str | None
    champion_after: str | None
    scores: Scores
    shift: Shift
    shift_seconds: float  # what scoring the corrupted suite and the calibration took
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


def measure_shift(
    model: Any,
    clean: np.ndarray,
    corrupted: suite.Suite,
    fitted: calibration.Calibration,
    cfg: EvaluateConfig,
) -> Shift:
    """The model on every corruption of the suite, and its confidence on clean and corrupted
    images; `clean` is its raw output on the clean test images."""
    outputs = (
        np.stack(
            [
                predict(model, corrupted.images[name], batch_size=cfg.batch_size)
                for name in corrupted.names
            ]
        )
        if corrupted.names
        else np.zeros((0, *clean.shape), np.float32)
    )
    return Shift.measure(
        clean, outputs, corrupted.labels, corrupted.names, corrupted.sha256(), fitted
    )


def run_calibration(run: dict[str, Any]) -> calibration.Calibration:
    """The calibration the train stage fitted (run.json); none for runs made before it."""
    fitted = run.get("calibration")
    return calibration.Calibration.from_dict(fitted) if fitted else calibration.IDENTITY


def write_reports(
    paths: PathsConfig,
    test: Split,
    probabilities: np.ndarray,
    scores: Scores,
    shift: Shift,
    champion_shift: dict[str, float] | None,
    cfg: EvaluateConfig,
) -> dict[str, Any]:
    """The stage's DVC metrics and plots; returns the metrics dict."""
    folder = Path(paths.eval_plots)
    metrics = {**metrics_dict(scores), **shift.metrics()}
    write_json(paths.eval_metrics, metrics)
    plots.write_confusion_csv(folder / CONFUSION_CSV, test.labels, scores.predictions)
    plots.write_class_recall_csv(folder / CLASS_RECALL_CSV, scores.recall)
    plots.plot_confusion_png(folder / CONFUSION_PNG, scores.confusion)
    plots.plot_misclassified_grid(
        folder / MISCLASSIFIED_PNG,
        test.images,
        test.labels,
        scores.predictions,
        probabilities,
        cfg.misclassified_grid,
    )
    plots.plot_class_recall_png(folder / CLASS_RECALL_PNG, scores.recall)
    plots.write_corruption_csv(folder / CORRUPTION_CSV, shift.accuracy, champion_shift)
    plots.plot_corruption_png(folder / CORRUPTION_PNG, shift.accuracy, champion_shift)
    curves = {
        "clean, uncalibrated": shift.clean.reliability_raw,
        "clean, calibrated": shift.clean.reliability,
        "corrupted, calibrated": shift.corrupted.reliability,
    }
    plots.write_reliability_csv(folder / RELIABILITY_CSV, curves)
    plots.plot_reliability_png(
        folder / RELIABILITY_PNG, curves, temperature=shift.calibration.temperature
    )
    return metrics


def log_to_run(run_id: str, scores: Scores, shift: Shift, paths: PathsConfig) -> None:
    """The same measurements on the training run, under `evaluation/`."""
    flat = {
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
        "test_macro_f1": scores.macro_f1,
        **shift.flat_metrics(),
    }
    for cls in range(len(scores.recall)):
        flat[f"test_recall_{cls}"] = scores.recall[cls]
        flat[f"test_precision_{cls}"] = scores.precision[cls]
    runs.log_metrics(flat, run_id=run_id)
    folder = Path(paths.eval_plots)
    for name in (
        CONFUSION_PNG,
        MISCLASSIFIED_PNG,
        CLASS_RECALL_PNG,
        CONFUSION_CSV,
        CORRUPTION_PNG,
        CORRUPTION_CSV,
        RELIABILITY_PNG,
        RELIABILITY_CSV,
    ):
        runs.log_artifact(folder / name, "evaluation", run_id=run_id)


def log_outcomes(
    run_id: str,
    scores: Scores,
    shift: Shift,
    probabilities: np.ndarray,
    test_sha256: str,
    model_sha256: str,
) -> None:
    """Per-image results of this evaluation, as `evaluation/outcomes.npz` on the run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / OUTCOMES
        write_npz(
            path,
            {
                "correct": scores.correct,
                "corrupted_correct": shift.correct,
                "corruptions": np.array(shift.names, dtype=str),
                "probabilities": calibration.scale(
                    probabilities, shift.calibration.temperature
                ).astype(np.float32),
                "test_sha256": np.array(test_sha256),
                "suite_sha256": np.array(shift.suite_sha256),
                "model_sha256": np.array(model_sha256),
            },
            compress=True,
        )
        runs.log_artifact(path, "evaluation", run_id=run_id)


def log_reference(run_id: str, test: Split, calibrated: np.ndarray) -> None:
    """What production traffic is compared with (`mnist-pipeline monitor`): the model's
    calibrated outputs on the clean test set, the images' statistics and which answers were
    right, as `monitoring/reference.npz` on the run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.npz"
        Reference.labelled(test.images, calibrated, test.labels).save(path)
        runs.log_artifact(path, "monitoring", run_id=run_id)


def recorded_corrupted(run_id: str, suite_sha256: str, names: list[str]) -> np.ndarray | None:
    """A run's recorded per-image results on the corrupted suite `suite_sha256`, if it has
    them for these corruptions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = runs.download_artifact(run_id, f"evaluation/{OUTCOMES}", tmp)
        return None if path is None else corrupted_in(path, suite_sha256, names)


def corrupted_in(
    path: str | os.PathLike[str], suite_sha256: str, names: list[str]
) -> np.ndarray | None:
    """The per-image results on the corrupted suite `suite_sha256` recorded in the npz file
    `path` (an evaluation's outcomes, or the gate service's record), if it holds them for
    these corruptions."""
    try:
        with np.load(path, allow_pickle=False) as record:
            if str(record["suite_sha256"]) != suite_sha256 or list(record["corruptions"]) != names:
                return None
            return np.asarray(record["corrupted_correct"], dtype=bool)
    except (OSError, KeyError, ValueError):
        return None


def load_keras(model_uri: str) -> Any:
    """The Keras model behind `model_uri` (the served pyfunc's `.keras` artifact, or a model
    logged with MLflow's Keras flavour), loaded in safe mode (`models.load`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = logged_models.download(model_uri, tmp)
        return models.load(logged_models.keras_file_in(folder, model_uri))


def served_parity(model_uri: str, test: Split, keras_probabilities: np.ndarray) -> gate.Parity:
    """Load the logged model as MLflow serves it (pyfunc: the ONNX export in ONNX Runtime)
    and compare its answers on the test images with the Keras model's
    (`keras_probabilities`: calibrated as the pyfunc is meant to calibrate them); the same
    for the version's int8 graph, when it has one (`Parity.int8`)."""
    try:
        pyfunc = logged_models.load_pyfunc(model_uri)
        served = np.asarray(pyfunc.predict(test.images), dtype=np.float32)
    except (PipelineError, OSError, ValueError, RuntimeError) as err:
        return _parity(
            test, keras_probabilities, None, f"could not load/predict {model_uri} as pyfunc: {err}"
        )
    parity = _parity(test, keras_probabilities, served)
    folder = pyfunc.folder  # versions logged before int8 graphs were made have none
    if folder is None or not (folder / mnist_onnx.INT8_FILE).is_file():
        return parity
    try:
        int8_probabilities = mnist_onnx.OnnxDigitModel(folder, precision="int8").predict(
            test.images
        )
    except Exception as err:  # noqa: BLE001 - ONNX Runtime's errors (a corrupt graph among
        # them) are plain Exceptions; the optional graph must never stop the decision
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return dataclasses.replace(
            parity, int8=_parity(test, keras_probabilities, None, f"could not run it: {why}")
        )
    return dataclasses.replace(parity, int8=_parity(test, keras_probabilities, int8_probabilities))


def _parity(
    test: Split, keras_probabilities: np.ndarray, served: np.ndarray | None, error: str = ""
) -> gate.Parity:
    """`served` (None: it could not run, `error` says why) against the Keras answers."""
    keras_labels = keras_probabilities.argmax(axis=1)
    keras_accuracy = float(np.mean(keras_labels == test.labels)) if len(test) else math.nan
    if served is not None and served.shape != keras_probabilities.shape:
        error = f"served output shape {served.shape} != Keras {keras_probabilities.shape}"
        served = None
    if served is None:
        return gate.Parity(
            images=len(test),
            disagreements=len(test),
            keras_accuracy=keras_accuracy,
            served_accuracy=math.nan,
            max_difference=math.nan,
            error=error,
        )
    served_labels = served.argmax(axis=1)
    return gate.Parity(
        images=len(test),
        disagreements=int(np.count_nonzero(served_labels != keras_labels)),
        keras_accuracy=keras_accuracy,
        served_accuracy=float(np.mean(served_labels == test.labels)) if len(test) else math.nan,
        max_difference=float(np.max(np.abs(served - keras_probabilities))) if len(test) else 0.0,
    )


def champion_on(
    name: str,
    test: Split,
    corrupted: suite.Suite,
    cfg: EvaluateConfig,
    suite_sha256: str,
    records: Records | None = None,
) -> tuple[gate.Champion, str] | None:
    """The current champion re-scored on `test`, with its results on the corrupted suite
    (recorded by its own evaluation on this suite, else scored now), and where those came
    from; None when there is no champion. `records`: where recorded results are read
    (default: the outcomes its evaluation logged on its training run)."""
    version = registry.champion(name)
    if version is None:
        return None
    model = load_keras(registry.version_uri(name, version.version))
    probabilities, scores = measure(model, test, cfg)
    recorded = None
    if records is not None:
        recorded = records(str(version.version), suite_sha256, corrupted.names)
    elif version.tags.get("run_id"):
        recorded = recorded_corrupted(version.tags["run_id"], suite_sha256, corrupted.names)
    source = "recorded by its evaluation on this suite"
    if recorded is None or recorded.shape != (len(corrupted.names), len(test)):
        shift = measure_shift(model, probabilities, corrupted, calibration.IDENTITY, cfg)
        recorded, source = shift.correct, "scored now (no record on this suite)"
    return gate.Champion(
        version=str(version.version),
        accuracy=scores.accuracy,
        correct=scores.correct,
        test_sha256=test.sha256(),
        corrupted_correct=recorded,
        suite_sha256=suite_sha256,
    ), source


@dataclass
class Judgement:
    """One gate decision on a registered version, as the stage reports it."""

    verdict: gate.Verdict
    champion_before: str | None
    champion_after: str | None
    champion_corrupted: dict[str, float] | None  # the champion's accuracy per corruption
    champion_source: str  # where the champion's corrupted-suite results came from
    budget: reuse.Budget
    decided: dict[str, Any]  # verdict.to_dict()


def judge(
    name: str,
    version: Any,
    candidate: gate.Candidate,
    scores: Scores,
    shift: Shift,
    fitted: calibration.Calibration,
    test: Split,
    corrupted: suite.Suite,
    eval_cfg: EvaluateConfig,
    gate_cfg: GateConfig,
    lock: locks.Held,
    *,
    run_id: str,
    tags: dict[str, str] | None = None,
    records: Records | None = None,
) -> Judgement:
    """Decide on `version` (holding `candidate`'s measurements) against the current champion,
    record the decision on the version and in the history, and move `champion` if it passed.
    Call it holding the promotion lock `lock`."""
    version_id = str(version.version)
    current = registry.champion(name)
    champion_before = str(current.version) if current else None
    reigning = champion_before == version_id
    # Re-evaluating the champion itself: only the absolute rules apply.
    found = (
        champion_on(name, test, corrupted, eval_cfg, shift.suite_sha256, records)
        if current and not reigning
        else None
    )
    champion, champion_source = found if found else (None, "")
    # Under the lock: the decisions on this test set are counted in the order made.
    spent = reuse.budget(
        reuse.decisions_on(history.entries(name), candidate.test_sha256), gate_cfg.alpha
    )
    withdrawn = version.tags.get(registry.WITHDRAWN, "")
    verdict = gate.decide(
        dataclasses.replace(candidate, withdrawn=withdrawn),
        champion,
        gate_cfg,
        reigning=reigning,
        budget=spent,
    )
    int8_servable, int8_parity = gate.int8_servable(candidate.parity)
    registry.set_version_tags(
        name,
        version_id,
        {
            registry.INT8_SERVABLE: str(int8_servable).lower(),
            registry.INT8_PARITY: int8_parity[:4000],
            "gate.passed": str(verdict.passed).lower(),
            "gate.reason": verdict.reason[:4000],
            "test_accuracy": f"{scores.accuracy:.6f}",
            "test_loss": f"{scores.loss:.6f}",
            "test_macro_f1": f"{scores.macro_f1:.6f}",
            "corrupted_mean_accuracy": f"{shift.mean_accuracy:.6f}",
            "test_ece": f"{shift.clean.ece:.6f}",
            # What the version's served model applies (its calibration.json artifact).
            "calibration_temperature": f"{fitted.temperature:.6g}",
            "abstain_threshold": f"{fitted.threshold:.6g}",
            **(tags or {}),
        },
    )
    if verdict.passed and not reigning:
        lock.check()  # the decision stands only while no one else can move the alias
        registry.promote(name, version_id)
    champion_after = version_id if verdict.passed else champion_before
    decided = verdict.to_dict()
    # Under the same lock: concurrent gates get distinct numbers in decision order.
    history.append(
        name,
        history.gate_entry(
            decided,
            candidate=version_id,
            champion_before=champion_before,
            champion_after=champion_after,
            run_id=run_id,
            test_sha256=candidate.test_sha256,
        ),
    )
    champion_accuracy = None
    if champion is not None and champion.corrupted_correct is not None:
        champion_accuracy = dict(
            zip(shift.names, champion.corrupted_correct.mean(axis=1).tolist(), strict=True)
        )
    return Judgement(
        verdict=verdict,
        champion_before=champion_before,
        champion_after=champion_after,
        champion_corrupted=champion_accuracy,
        champion_source=champion_source,
        budget=spent,
        decided=decided,
    )


def evaluate(
    paths: PathsConfig, eval_cfg: EvaluateConfig, gate_cfg: GateConfig, tracking_cfg: TrackingConfig
) -> Decision:
    """Measure `paths.model` on the test set and the corrupted suite, run the gate, register
    and maybe promote.

    With a gate service (`GATE_SERVICE_ENV` set, as on a team server with logins), this
    checkout only registers the version: the service re-scores it, decides and moves the
    alias, and this waits for its verdict.
    """
    model = models.load(paths.model)  # safe mode: no code from the file runs
    run = read_run_file(paths.run)
    fitted = run_calibration(run)
    test = load_split(paths.processed, "test")
    corrupted = suite.load(paths.corrupted, test)
    probabilities, scores = measure(model, test, eval_cfg)
    started = time.perf_counter()
    shift = measure_shift(model, probabilities, corrupted, fitted, eval_cfg)
    shift_seconds = time.perf_counter() - started
    service_wait = gate_service_wait()

    store.connect(tracking_cfg)
    training_run = runs.run_info(run["run_id"], named_in=str(paths.run))
    trained_tags = training_run.data.tags
    candidate = None
    if service_wait is None:
        parity = served_parity(
            run["model_uri"], test, calibration.scale(probabilities, fitted.temperature)
        )
        candidate = gate.Candidate(
            accuracy=scores.accuracy,
            loss=scores.loss,
            class_recall=list(scores.recall),
            n_test=len(test),
            test_sha256=test.sha256(),
            trained_test_sha256=trained_tags.get("data.test_sha256"),
            correct=scores.correct,
            parity=parity,
            ece=shift.clean.ece,
            corrupted_correct=shift.correct,
            suite_sha256=shift.suite_sha256,
        )

    name = tracking_cfg.registered_model
    model_sha = sha256_file(paths.model)
    with locks.held("registry", locks.lock_url(tracking_cfg.lock_url)) as lock:
        existing = registry.find_version(name, "model_sha256", model_sha)
        version = existing or registry.register(
            run["model_uri"],
            name,
            tags={
                "model_sha256": model_sha,
                "run_id": run["run_id"],
                "data.sha256": trained_tags.get("data.sha256", ""),
                "data.test_sha256": test.sha256(),
                "git.commit": trained_tags.get(runs.GIT_COMMIT, "none"),
            },
        )
        version_id = str(version.version)
        if candidate is not None:
            judgement = judge(
                name,
                version,
                candidate,
                scores,
                shift,
                fitted,
                test,
                corrupted,
                eval_cfg,
                gate_cfg,
                lock,
                run_id=run["run_id"],
            )
    if service_wait is not None:  # no candidate here: the gate service judges
        judgement = await_verdict(name, version_id, service_wait)
    verdict, decided, spent = judgement.verdict, judgement.decided, judgement.budget
    champion_before, champion_after = judgement.champion_before, judgement.champion_after
    champion_accuracy = judgement.champion_corrupted

    write_reports(paths, test, probabilities, scores, shift, champion_accuracy, eval_cfg)
    log_to_run(run["run_id"], scores, shift, paths)
    log_outcomes(run["run_id"], scores, shift, probabilities, test.sha256(), model_sha)
    log_reference(run["run_id"], test, calibration.scale(probabilities, fitted.temperature))
    report = {
        **decided,
        "candidate_version": version_id,
        "champion_version_before": champion_before,
        "champion_version": champion_after,
        "registered_model": name,
        "run_id": run["run_id"],
        "registered_now": existing is None,
        "decided_by": "gate service" if candidate is None else "this checkout",
        "champion_corrupted_results": judgement.champion_source or None,
        "budget": {
            "alpha": spent.alpha,
            "decisions_before": spent.decisions,
            "level": spent.level,
            "unspent_before": spent.unspent,
        },
        # What DVC saw of the champion for this run: the champion stage keeps it while
        # the champion is still `champion_version`, so this decision reruns nothing.
        "champion_record": champion_record.read(paths.champion),
    }
    write_json(paths.gate, report)
    folder = Path(paths.eval_plots)
    for written in card.write(
        folder,
        card.Facts(
            registered_model=name,
            version=version_id,
            run_id=run["run_id"],
            params=training_run.data.params,
            tags=trained_tags,
            scores=scores,
            shift=shift,
            champion_corrupted=champion_accuracy,
            budget=spent,
            served_bytes=training_run.data.metrics.get("onnx_bytes"),
            int8_bytes=training_run.data.metrics.get("onnx_int8_bytes"),
            test_sha256=test.sha256(),
            verdict=decided,
            champion_before=champion_before,
            champion_after=champion_after,
            pictures={
                "Confusion matrix (test set)": folder / CONFUSION_PNG,
                "Recall per class (test set)": folder / CLASS_RECALL_PNG,
                "Accuracy per corruption": folder / CORRUPTION_PNG,
                "Reliability diagram": folder / RELIABILITY_PNG,
            },
        ),
    ):
        runs.log_artifact(written, "evaluation", run_id=run["run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "gate.json"
        write_json(copy, report)
        runs.log_artifact(copy, "evaluation", run_id=run["run_id"])
    runs.set_tags(
        {"gate.passed": str(verdict.passed).lower(), "registered_version": version_id},
        run_id=run["run_id"],
    )
    line = gate.summary_line(verdict, version_id, champion_before)
    return Decision(
        verdict=verdict,
        version=version_id,
        champion_before=champion_before,
        champion_after=champion_after,
        scores=scores,
        shift=shift,
        shift_seconds=shift_seconds,
        line=line,
    )


# --- the team's gate service -----------------------------------------------------------------
# On a team server with logins only the gate identity moves `champion` (team/release_gate.py).
# Members' evaluations register their version and wait; the service (team/gate_service.py)
# re-scores each new version on its own copy of the test data (`rescore`), decides with the
# same rules (`judge`) and writes its verdict on the version as one tag, last.


def gate_service_wait() -> float | None:
    """Seconds to wait for the team's gate service (`GATE_SERVICE_ENV`), or None: decide
    here."""
    text = os.environ.get(GATE_SERVICE_ENV, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PromotionError(
            f"{GATE_SERVICE_ENV}={text!r}: expected the seconds to wait for "
            "the team's gate service (a number > 0), or unset it to decide "
            "in this checkout"
        )
    return seconds


def await_verdict(name: str, version: str, wait_s: float, poll_s: float = 1.0) -> Judgement:
    """The gate service's verdict on `version` of `name`, once it is written."""
    deadline = time.monotonic() + wait_s
    while True:
        found = registry.version(name, version)
        text = found.tags.get(VERDICT_TAG) if found is not None else None
        if text:
            return verdict_from_tag(text, f"{VERDICT_TAG} of {name} version {version}")
        if time.monotonic() > deadline:
            raise PromotionError(
                f"the team's gate service gave no verdict on {name} version {version} within "
                f"{wait_s:.0f} s; it stays registered, undecided. Check the service "
                "(python -m mnist_pipeline.team status), then run the evaluate stage again to "
                f"wait again, or raise {GATE_SERVICE_ENV}"
            )
        time.sleep(poll_s)


def verdict_tag(judgement: Judgement, *, scored: dict[str, Any]) -> str:
    """The service's verdict as one version tag (under the registry's 5,000 characters)."""
    spent = judgement.budget
    return history.encode(
        {
            **judgement.decided,
            "champion_before": judgement.champion_before,
            "champion_after": judgement.champion_after,
            "champion_source": judgement.champion_source,
            "budget": {
                "alpha": spent.alpha,
                "decisions": spent.decisions,
                "level": spent.level,
                "levels": list(spent.levels),
            },
            "scored": scored,
            "decided": history.context(),
        }
    )


def verdict_from_tag(text: str, where: str) -> Judgement:
    try:
        saved = json.loads(text)
        budget = saved["budget"]
        verdict = gate.Verdict(
            passed=bool(saved["passed"]),
            p_value=saved.get("p_value"),
            reason=saved["reason"],
            level=saved.get("level"),
            decision=saved.get("decision"),
            rules=[
                gate.Rule(
                    name=r["name"],
                    passed=r["passed"],
                    value=r["value"],
                    threshold=r["threshold"],
                    detail=r.get("detail", ""),
                )
                for r in saved["rules"]
            ],
        )
        spent = reuse.Budget(
            alpha=float(budget["alpha"]),
            decisions=int(budget["decisions"]),
            level=float(budget["level"]),
            levels=tuple(float(v) for v in budget["levels"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise PromotionError(f"{where}: not a verdict the gate service writes ({err!r})") from None
    return Judgement(
        verdict=verdict,
        champion_before=saved.get("champion_before"),
        champion_after=saved.get("champion_after"),
        champion_corrupted=None,
        champion_source=saved.get("champion_source") or "",
        budget=spent,
        decided=verdict.to_dict(),
    )


@dataclass
class Rescored:
    judgement: Judgement
    scores: Scores
    shift: Shift


def rescore(
    name: str,
    number: str,
    test: Split,
    corrupted: suite.Suite,
    eval_cfg: EvaluateConfig,
    gate_cfg: GateConfig,
    lock_url: str | None,
    records: Path,
    on_scored: Any = None,
) -> Rescored:
    """The gate service's decision on version `number` of `name`: score the registered model
    itself (never the metrics its run reports) on `test` and `corrupted`, check its served
    export, then decide and record under the promotion lock. The verdict tag is written
    last, so a service stopped before it decides the version again."""
    version = registry.version(name, number)
    if version is None:
        raise PromotionError(f"{name} version {number}: not in the registry")
    uri = registry.version_uri(name, number)
    with tempfile.TemporaryDirectory() as tmp:
        folder = logged_models.download(uri, tmp)
        digest = tree_sha256(folder)
        model = models.load(logged_models.keras_file_in(folder, uri))
        saved = logged_models.calibration_in(folder)
    fitted = (
        dataclasses.replace(
            calibration.IDENTITY, temperature=saved["temperature"], threshold=saved["threshold"]
        )
        if saved
        else calibration.IDENTITY
    )
    probabilities, scores = measure(model, test, eval_cfg)
    shift = measure_shift(model, probabilities, corrupted, fitted, eval_cfg)
    parity = served_parity(uri, test, calibration.scale(probabilities, fitted.temperature))
    run_id = version.tags.get("run_id") or version.run_id or ""
    trained_test = None
    if run_id:
        try:
            trained_test = runs.run_info(run_id, named_in=f"{name} version {number}").data.tags.get(
                "data.test_sha256"
            )
        except PipelineError:
            trained_test = None
    candidate = gate.Candidate(
        accuracy=scores.accuracy,
        loss=scores.loss,
        class_recall=list(scores.recall),
        n_test=len(test),
        test_sha256=test.sha256(),
        trained_test_sha256=trained_test,
        correct=scores.correct,
        parity=parity,
        ece=shift.clean.ece,
        corrupted_correct=shift.correct,
        suite_sha256=shift.suite_sha256,
    )
    write_npz(
        records / f"{number}.npz",
        {
            "corrupted_correct": shift.correct,
            "corruptions": np.array(shift.names, dtype=str),
            "suite_sha256": np.array(shift.suite_sha256),
        },
        compress=True,
    )
    if on_scored is not None:
        on_scored(scores, shift)

    def recorded(champion: str, suite_sha256: str, names: list[str]) -> np.ndarray | None:
        return corrupted_in(records / f"{champion}.npz", suite_sha256, names)

    with locks.held("registry", lock_url) as lock:
        judgement = judge(
            name,
            version,
            candidate,
            scores,
            shift,
            fitted,
            test,
            corrupted,
            eval_cfg,
            gate_cfg,
            lock,
            run_id=run_id,
            records=recorded,
            tags={
                DIGEST_TAG: digest,
                # What it was scored on (rollback checks it), not the claim.
                "data.test_sha256": test.sha256(),
            },
        )
        registry.set_version_tags(
            name,
            number,
            {
                VERDICT_TAG: verdict_tag(
                    judgement,
                    scored={
                        "test_accuracy": scores.accuracy,
                        "corrupted_mean_accuracy": shift.mean_accuracy,
                        "test_ece": shift.clean.ece,
                        "test_sha256": test.sha256(),
                        "suite_sha256": shift.suite_sha256,
                        "model_tree_sha256": digest,
                    },
                )
            },
        )
    return Rescored(judgement=judgement, scores=scores, shift=shift)


def refuse(
    name: str, number: str, reason: str, test: Split, gate_cfg: GateConfig, lock_url: str | None
) -> Judgement:
    """The gate service's verdict on a version it cannot score (no model it can load): a
    rejection saying why, recorded as any other."""
    with locks.held("registry", lock_url):
        version = registry.version(name, number)
        run_id = (version.tags.get("run_id") or version.run_id or "") if version else ""
        spent = reuse.budget(
            reuse.decisions_on(history.entries(name), test.sha256()), gate_cfg.alpha
        )
        current = registry.champion(name)
        before = str(current.version) if current else None
        verdict = gate.Verdict(
            passed=False,
            p_value=None,
            reason=reason,
            rules=[
                gate.Rule(name="scored", passed=False, value=None, threshold=None, detail=reason)
            ],
        )
        decided = verdict.to_dict()
        registry.set_version_tags(
            name, number, {"gate.passed": "false", "gate.reason": reason[:4000]}
        )
        history.append(
            name,
            history.gate_entry(
                decided,
                candidate=number,
                champion_before=before,
                champion_after=before,
                run_id=run_id,
                test_sha256=test.sha256(),
            ),
        )
        judgement = Judgement(
            verdict=verdict,
            champion_before=before,
            champion_after=before,
            champion_corrupted=None,
            champion_source="",
            budget=spent,
            decided=decided,
        )
        registry.set_version_tags(name, number, {VERDICT_TAG: verdict_tag(judgement, scored={})})
    return judgement
