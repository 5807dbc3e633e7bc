"""The promotion gate: pure rules deciding whether a candidate model may become champion.

`decide` takes what the evaluate stage measured (a `Candidate`), what the registry says
about the current champion (a `Champion`, or None on the first run) and the `gate` config,
and returns a `Verdict` recording every rule, passed or not. It never raises on bad metric
values: NaN, None or an empty test set fail a rule instead. The registry reads and the
alias move live at the edge, in the stage and tracking code, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import GateConfig
from ..data.splits import NUM_CLASSES
from ..files import json_safe
from .scores import mcnemar_exact

# Accuracies are ratios of counts; an improvement equal to min_improvement up to float
# rounding (0.9512 - 0.95 != 0.0012 in binary) must count as meeting it.
TOLERANCE = 1e-9


@dataclass(frozen=True, eq=False)  # eq=False: the array field makes == ambiguous
class Candidate:
    accuracy: float | None
    loss: float | None
    class_recall: list[float] | None
    n_test: int
    test_sha256: str                  # the test set this evaluation scored
    trained_test_sha256: str | None   # the test set the training run recorded
    correct: np.ndarray               # (n_test,) bool, one entry per test image
    pyfunc_matches_keras: bool | None  # None: the smoke test did not run or could not load
    smoke_detail: str = ""
    withdrawn: str = ""  # why a rollback took `champion` away from this version, if one did


@dataclass(frozen=True, eq=False)
class Champion:
    version: str
    accuracy: float
    correct: np.ndarray  # (n_test,) bool on the test set `test_sha256`
    test_sha256: str


@dataclass(frozen=True)
class Rule:
    name: str
    passed: bool
    value: object
    threshold: object
    detail: str


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rules: list[Rule]
    p_value: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready (NaN -> None, numpy -> Python), for `gate.json` and MLflow."""
        return json_safe({
            "passed": self.passed,
            "reason": self.reason,
            "p_value": self.p_value,
            "rules": [{"name": r.name, "passed": r.passed, "value": r.value,
                       "threshold": r.threshold, "detail": r.detail} for r in self.rules],
        })

    def failed(self) -> list[Rule]:
        return [rule for rule in self.rules if not rule.passed]


def decide(candidate: Candidate, champion: Champion | None, cfg: GateConfig,
           *, reigning: bool = False) -> Verdict:
    """Apply every rule in order and record each one; the candidate passes if all pass.

    `reigning`: the candidate is the champion itself, re-checked (only absolute rules apply).
    """
    rules = [
        _test_set_nonempty(candidate),
        _metrics_present(candidate),
        _test_data_matches_training(candidate),
        _min_accuracy(candidate, cfg),
        _min_class_recall(candidate, cfg),
        _pyfunc_smoke_test(candidate),
    ]
    if candidate.withdrawn:
        rules.append(_not_withdrawn(candidate))
    p_value = None
    if champion is not None:
        mismatch = _incomparable(candidate, champion)
        p_value = None if mismatch else mcnemar_exact(candidate.correct, champion.correct)[2]
        rules.append(_beats_champion(candidate, champion, cfg, mismatch))
        if cfg.require_significance:
            rules.append(_significant(candidate, champion, cfg, mismatch))

    failed = [rule for rule in rules if not rule.passed]
    if failed:
        reason = f"{failed[0].name}: {failed[0].detail}"
    elif champion is not None:
        gain = float(candidate.accuracy) - float(champion.accuracy)  # type: ignore[arg-type]
        test = (f"p={_fmt_p(p_value)} < {cfg.alpha:g}" if cfg.require_significance
                else f"p={_fmt_p(p_value)}, significance not required")
        reason = f"beats champion {_label(champion.version)} by {gain:+.4f} ({test})"
    elif reigning:
        reason = f"passed all {len(rules)} rules (already champion, re-checked)"
    else:
        reason = f"passed all {len(rules)} rules (no champion yet)"
    return Verdict(passed=not failed, rules=rules, p_value=p_value, reason=reason)


def summary_line(verdict: Verdict, candidate_version: str | None,
                 champion_version: str | None) -> str:
    """One line for the end of the evaluate stage, e.g.

    `gate: PASSED — v3 beats champion v2 by +0.0041 (p=0.0123 < 0.05); v3 is now champion`
    `gate: REJECTED — v3 fails min_accuracy: 0.9410 < 0.9500; champion stays v2`
    """
    candidate = _label(candidate_version) if candidate_version else "the candidate"
    if verdict.passed:
        now = "stays" if candidate_version and candidate_version == champion_version else "is now"
        return f"gate: PASSED — {candidate} {verdict.reason}; {candidate} {now} champion"
    more = len(verdict.failed()) - 1
    extra = f" (+{more} more failing rule{'s' if more > 1 else ''})" if more > 0 else ""
    stays = (f"champion stays {_label(champion_version)}" if champion_version
             else "no champion yet")
    return f"gate: REJECTED — {candidate} fails {verdict.reason}{extra}; {stays}"


# --- the rules, in order -------------------------------------------------------------------

def _test_set_nonempty(candidate: Candidate) -> Rule:
    n = candidate.n_test
    ok = isinstance(n, (int, np.integer)) and n > 0
    return Rule("test_set_nonempty", ok, n, "> 0",
                f"{n} test images" if ok else f"the test set is empty ({n} images)")


def _metrics_present(candidate: Candidate) -> Rule:
    problems = []
    for name in ("accuracy", "loss"):
        value = getattr(candidate, name)
        if not _finite(value):
            problems.append(f"{name} ({value!r})")
    recall = candidate.class_recall
    if recall is None:
        problems.append("class_recall (None)")
    elif len(recall) != NUM_CLASSES:
        problems.append(f"class_recall ({len(recall)} values, expected {NUM_CLASSES})")
    else:
        problems += [f"class_recall[{cls}] ({value!r})"
                     for cls, value in enumerate(recall) if not _finite(value)]
    if problems:
        return Rule("metrics_present", False, problems, "finite",
                    "missing or not finite: " + ", ".join(problems))
    return Rule("metrics_present", True, [], "finite",
                f"accuracy, loss and {NUM_CLASSES} class recalls are finite")


def _test_data_matches_training(candidate: Candidate) -> Rule:
    trained, tested = candidate.trained_test_sha256, candidate.test_sha256
    if not trained:
        return Rule("test_data_matches_training", False, tested, trained,
                    "the training run recorded no test set hash, so the test data cannot be "
                    "checked; retrain with this pipeline (dvc repro train)")
    if trained != tested:
        return Rule("test_data_matches_training", False, tested, trained,
                    f"test set sha256 {_short(tested)} differs from {_short(trained)} recorded "
                    "by the training run; rerun the pipeline (dvc repro)")
    return Rule("test_data_matches_training", True, tested, trained,
                f"test set sha256 {_short(tested)} matches the training run's")


def _min_accuracy(candidate: Candidate, cfg: GateConfig) -> Rule:
    accuracy = candidate.accuracy
    if not _finite(accuracy):
        return Rule("min_accuracy", False, accuracy, cfg.min_accuracy,
                    f"accuracy is missing or not finite ({accuracy!r})")
    ok = float(accuracy) >= cfg.min_accuracy  # type: ignore[arg-type]
    sign = ">=" if ok else "<"
    return Rule("min_accuracy", ok, float(accuracy), cfg.min_accuracy,  # type: ignore[arg-type]
                f"{accuracy:.4f} {sign} {cfg.min_accuracy:.4f}")


def _min_class_recall(candidate: Candidate, cfg: GateConfig) -> Rule:
    recall = candidate.class_recall
    if (recall is None or len(recall) != NUM_CLASSES
            or not all(_finite(value) for value in recall)):
        return Rule("min_class_recall", False, None, cfg.min_class_recall,
                    f"class recall is missing or not finite ({recall!r})")
    worst = int(np.argmin(np.asarray(recall, dtype=np.float64)))
    value = float(recall[worst])
    ok = value >= cfg.min_class_recall
    sign = ">=" if ok else "<"
    return Rule("min_class_recall", ok, value, cfg.min_class_recall,
                f"{'worst class' if ok else 'class'} {worst} recall {value:.4f} {sign} "
                f"{cfg.min_class_recall:.4f}")


def _pyfunc_smoke_test(candidate: Candidate) -> Rule:
    matches = candidate.pyfunc_matches_keras
    note = f": {candidate.smoke_detail}" if candidate.smoke_detail else ""
    if matches is True:
        detail = "the logged pyfunc model predicts as the Keras model does" + note
    elif matches is False:
        detail = "the logged pyfunc model's predictions differ from the Keras model's" + note
    else:
        detail = "the pyfunc smoke test did not run or could not load the model" + note
    return Rule("pyfunc_smoke_test", matches is True, matches, True, detail)


def _not_withdrawn(candidate: Candidate) -> Rule:
    """A version a rollback moved `champion` away from stays away: without this, the next
    `dvc repro` of the workspace that made it would promote it straight back."""
    return Rule("not_withdrawn", False, candidate.withdrawn, "",
                f"withdrawn by a rollback ({candidate.withdrawn}); only `mnist-pipeline "
                "champion rollback --to` this version makes it champion again")


def _incomparable(candidate: Candidate, champion: Champion) -> str:
    """Why candidate and champion cannot be compared image by image ('' if they can)."""
    if champion.test_sha256 != candidate.test_sha256:
        return (f"champion {_label(champion.version)} was scored on test set "
                f"{_short(champion.test_sha256)}, the candidate on "
                f"{_short(candidate.test_sha256)}; re-evaluate the champion on this test set")
    a, b = np.asarray(candidate.correct), np.asarray(champion.correct)
    if a.ndim != 1 or a.shape != b.shape:
        return (f"per-image results have shapes {a.shape} (candidate) and {b.shape} "
                f"(champion {_label(champion.version)}): not the same test images")
    return ""


def _beats_champion(candidate: Candidate, champion: Champion, cfg: GateConfig,
                    mismatch: str) -> Rule:
    name, threshold = "beats_champion", cfg.min_improvement
    if mismatch:
        return Rule(name, False, None, threshold, mismatch)
    if not _finite(candidate.accuracy):
        return Rule(name, False, None, threshold,
                    f"candidate accuracy is missing or not finite ({candidate.accuracy!r})")
    if not _finite(champion.accuracy):
        return Rule(name, False, None, threshold,
                    f"champion {_label(champion.version)} has no finite accuracy "
                    f"({champion.accuracy!r}); re-evaluate it")
    ours, theirs = float(candidate.accuracy), float(champion.accuracy)  # type: ignore[arg-type]
    gain = ours - theirs
    versus = f"champion {_label(champion.version)} ({ours:.4f} vs {theirs:.4f})"
    if gain <= 0:
        detail = (f"ties {versus}; a tie never replaces the champion" if gain == 0
                  else f"{gain:+.4f} against {versus}")
        return Rule(name, False, gain, threshold, detail)
    if gain + TOLERANCE < threshold:
        return Rule(name, False, gain, threshold,
                    f"{gain:+.4f} over {versus} < min_improvement {threshold:.4f}")
    return Rule(name, True, gain, threshold,
                f"{gain:+.4f} over {versus} >= min_improvement {threshold:.4f}")


def _significant(candidate: Candidate, champion: Champion, cfg: GateConfig,
                 mismatch: str) -> Rule:
    if mismatch:
        return Rule("significant", False, None, cfg.alpha, mismatch)
    gains, losses, p = mcnemar_exact(candidate.correct, champion.correct)
    # Significant *in the candidate's favour*: a clearly worse model differs significantly
    # too, and must not read as passing this rule.
    ok = p < cfg.alpha and gains > losses
    counts = (f"{gains} images only the candidate gets right, {losses} only champion "
              f"{_label(champion.version)} does")
    sign = "<" if p < cfg.alpha else ">="
    favour = "" if ok or p >= cfg.alpha else ", in the champion's favour"
    return Rule("significant", ok, p, cfg.alpha,
                f"McNemar exact p={_fmt_p(p)} {sign} alpha {cfg.alpha:g}{favour} ({counts})")


# --- helpers -------------------------------------------------------------------------------

def _finite(value: object) -> bool:
    if value is None or isinstance(value, (bool, np.bool_)):
        return False
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _label(version: str | None) -> str:
    """'3' -> 'v3'; anything already labelled or non-numeric is shown as it is."""
    text = str(version)
    return f"v{text}" if text.isdigit() else text


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else repr(digest)
