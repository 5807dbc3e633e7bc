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
from .reuse import Budget
from .scores import Z_95_ONE_SIDED, mcnemar_exact, p_text, paired_difference, paired_z_test

# Accuracies are ratios of counts; an improvement equal to min_improvement up to float
# rounding (0.9512 - 0.95 != 0.0012 in binary) must count as meeting it.
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Parity:
    """The served artifact (the ONNX export, through the logged pyfunc) against the Keras
    model it was exported from, on the test images."""

    images: int
    disagreements: int  # test images whose served label differs from Keras'
    keras_accuracy: float
    served_accuracy: float
    max_difference: float  # the largest difference of any probability
    error: str = ""  # why the served model could not be loaded or run
    int8: Parity | None = None  # the version's int8 graph against the same Keras model, if any

    @property
    def agreement(self) -> float:
        return 1 - self.disagreements / self.images if self.images else math.nan


@dataclass(frozen=True, eq=False)  # eq=False: the array field makes == ambiguous
class Candidate:
    accuracy: float | None
    loss: float | None
    class_recall: list[float] | None
    n_test: int
    test_sha256: str  # the test set this evaluation scored
    trained_test_sha256: str | None  # the test set the training run recorded
    correct: np.ndarray  # (n_test,) bool, one entry per test image
    parity: Parity | None  # None: the served model was not checked
    withdrawn: str = ""  # why a rollback took `champion` away from this version, if one did
    ece: float | None = None  # expected calibration error on the test set, after scaling
    # (corruptions, n_test) bool: per corrupted image, on the suite `suite_sha256`
    corrupted_correct: np.ndarray | None = None
    suite_sha256: str | None = None


@dataclass(frozen=True, eq=False)
class Champion:
    version: str
    accuracy: float
    correct: np.ndarray  # (n_test,) bool on the test set `test_sha256`
    test_sha256: str
    corrupted_correct: np.ndarray | None = None  # (corruptions, n_test) on `suite_sha256`
    suite_sha256: str | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    passed: bool
    value: object
    threshold: object
    detail: str


@dataclass(frozen=True)
class Evidence:
    """What the significance test weighs, candidate against champion: McNemar's exact test
    on the clean test images and, with `gate.robustness_gain`, the paired z-test of mean
    accuracy on the corrupted suite. Either may show the candidate better; with both, each
    is tested at half the decision's level (Bonferroni), so `p` is twice the smaller
    p-value in the candidate's favour."""

    gains: int  # clean test images only the candidate gets right
    losses: int  # ...and only the champion does
    p_clean: float
    corrupted_gain: float | None = None  # mean corruption accuracy, candidate - champion
    p_corrupted: float | None = None

    @property
    def endpoints(self) -> list[tuple[float, bool]]:
        """(p-value, in the candidate's favour) of each test made."""
        out = [(self.p_clean, self.gains > self.losses)]
        if self.p_corrupted is not None and self.corrupted_gain is not None:
            out.append((self.p_corrupted, self.corrupted_gain > 0))
        return out

    @property
    def favours_candidate(self) -> bool:
        return any(favour for _, favour in self.endpoints)

    @property
    def p(self) -> float:
        """Bonferroni-adjusted: the smallest p-value in the candidate's favour (of all, if
        none is) times the number of tests, at most 1."""
        tests = self.endpoints
        favoured = [p for p, favour in tests if favour] or [p for p, _ in tests]
        return min(1.0, len(tests) * min(favoured))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    rules: list[Rule]
    p_value: float | None
    reason: str
    level: float | None = None  # the significance level this decision was tested at
    decision: int | None = None  # its number among the comparisons on this test set

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON-ready (NaN -> None, numpy -> Python), for `gate.json` and MLflow."""
        return json_safe(
            {
                "passed": self.passed,
                "reason": self.reason,
                "p_value": self.p_value,
                "level": self.level,
                "decision": self.decision,
                "rules": [
                    {
                        "name": r.name,
                        "passed": r.passed,
                        "value": r.value,
                        "threshold": r.threshold,
                        "detail": r.detail,
                    }
                    for r in self.rules
                ],
            }
        )

    def failed(self) -> list[Rule]:
        return [rule for rule in self.rules if not rule.passed]


def decide(
    candidate: Candidate,
    champion: Champion | None,
    cfg: GateConfig,
    *,
    reigning: bool = False,
    budget: Budget | None = None,
) -> Verdict:
    """Apply every rule in order and record each one; the candidate passes if all pass.

    `reigning`: the candidate is the champion itself, re-checked (only absolute rules apply).
    `budget`: the decisions already made on this test set (`reuse.budget`); with
    `cfg.reuse`, the significance rule tests at its level instead of `cfg.alpha`.
    `p_value` is the significance test's (`Evidence.p`).
    """
    rules = [
        _test_set_nonempty(candidate),
        _metrics_present(candidate),
        _test_data_matches_training(candidate),
        _min_accuracy(candidate, cfg),
        _min_class_recall(candidate, cfg),
        _served_parity(candidate, cfg),
    ]
    if cfg.max_ece is not None:
        rules.append(_calibrated(candidate, cfg.max_ece))
    if candidate.withdrawn:
        rules.append(_not_withdrawn(candidate))
    p_value = level = decision = None
    if champion is not None:
        mismatch = _incomparable(candidate, champion)
        evidence = None if mismatch else _evidence(candidate, champion, cfg.robustness_gain)
        p_value = None if evidence is None else evidence.p
        level, decision = cfg.alpha, None
        if cfg.reuse and budget is not None:
            level, decision = budget.level, budget.decisions + 1
        rules.append(_beats_champion(candidate, champion, cfg, mismatch))
        if cfg.require_significance:
            rules.append(_significant(evidence, champion, level, decision, mismatch))
        if cfg.robustness_margin is not None:
            rules.append(_robust_vs_champion(candidate, champion, cfg.robustness_margin))

    failed = [rule for rule in rules if not rule.passed]
    if failed:
        reason = f"{failed[0].name}: {failed[0].detail}"
    elif champion is not None:
        gain = float(candidate.accuracy) - float(champion.accuracy)  # type: ignore[arg-type]
        test = (
            f"{_p_is(p_value)} < {level:.3g}"
            if cfg.require_significance
            else f"{_p_is(p_value)}, significance not required"
        )
        assert evidence is not None  # every rule passed, so the two are comparable
        if evidence.p_corrupted is not None:
            test += (
                f": clean {_p_is(evidence.p_clean)}, corrupted "
                f"{evidence.corrupted_gain:+.4f} {_p_is(evidence.p_corrupted)}, Bonferroni"
            )
        reason = f"beats champion {_label(champion.version)} by {gain:+.4f} ({test})"
    elif reigning:
        reason = f"passed all {len(rules)} rules (already champion, re-checked)"
    else:
        reason = f"passed all {len(rules)} rules (no champion yet)"
    return Verdict(
        passed=not failed,
        rules=rules,
        p_value=p_value,
        reason=reason,
        level=level,
        decision=decision,
    )


def summary_line(
    verdict: Verdict, candidate_version: str | None, champion_version: str | None
) -> str:
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
    stays = f"champion stays {_label(champion_version)}" if champion_version else "no champion yet"
    return f"gate: REJECTED — {candidate} fails {verdict.reason}{extra}; {stays}"


# --- the rules, in order -------------------------------------------------------------------


def _test_set_nonempty(candidate: Candidate) -> Rule:
    n = candidate.n_test
    ok = isinstance(n, (int, np.integer)) and n > 0
    return Rule(
        "test_set_nonempty",
        ok,
        n,
        "> 0",
        f"{n} test images" if ok else f"the test set is empty ({n} images)",
    )


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
        problems += [
            f"class_recall[{cls}] ({value!r})"
            for cls, value in enumerate(recall)
            if not _finite(value)
        ]
    if problems:
        return Rule(
            "metrics_present",
            False,
            problems,
            "finite",
            "missing or not finite: " + ", ".join(problems),
        )
    return Rule(
        "metrics_present",
        True,
        [],
        "finite",
        f"accuracy, loss and {NUM_CLASSES} class recalls are finite",
    )


def _test_data_matches_training(candidate: Candidate) -> Rule:
    trained, tested = candidate.trained_test_sha256, candidate.test_sha256
    if not trained:
        return Rule(
            "test_data_matches_training",
            False,
            tested,
            trained,
            "the training run recorded no test set hash, so the test data cannot be "
            "checked; retrain with this pipeline (dvc repro train)",
        )
    if trained != tested:
        return Rule(
            "test_data_matches_training",
            False,
            tested,
            trained,
            f"test set sha256 {_short(tested)} differs from {_short(trained)} recorded "
            "by the training run; rerun the pipeline (dvc repro)",
        )
    return Rule(
        "test_data_matches_training",
        True,
        tested,
        trained,
        f"test set sha256 {_short(tested)} matches the training run's",
    )


def _min_accuracy(candidate: Candidate, cfg: GateConfig) -> Rule:
    accuracy = candidate.accuracy
    if not _finite(accuracy):
        return Rule(
            "min_accuracy",
            False,
            accuracy,
            cfg.min_accuracy,
            f"accuracy is missing or not finite ({accuracy!r})",
        )
    assert accuracy is not None  # _finite(None) is False
    ok = float(accuracy) >= cfg.min_accuracy
    sign = ">=" if ok else "<"
    return Rule(
        "min_accuracy",
        ok,
        float(accuracy),
        cfg.min_accuracy,
        f"{accuracy:.4f} {sign} {cfg.min_accuracy:.4f}",
    )


def _min_class_recall(candidate: Candidate, cfg: GateConfig) -> Rule:
    recall = candidate.class_recall
    if recall is None or len(recall) != NUM_CLASSES or not all(_finite(value) for value in recall):
        return Rule(
            "min_class_recall",
            False,
            None,
            cfg.min_class_recall,
            f"class recall is missing or not finite ({recall!r})",
        )
    worst = int(np.argmin(np.asarray(recall, dtype=np.float64)))
    value = float(recall[worst])
    ok = value >= cfg.min_class_recall
    sign = ">=" if ok else "<"
    return Rule(
        "min_class_recall",
        ok,
        value,
        cfg.min_class_recall,
        f"{'worst class' if ok else 'class'} {worst} recall {value:.4f} {sign} "
        f"{cfg.min_class_recall:.4f}",
    )


# The int8 graph (`make serve ARGS=--int8`) may be served while its test accuracy stays within
# this much of the Keras model's. Quantization rounds every weight and activation, so a few
# borderline images change label: the float graph's bounds (`gate.parity_agreement`,
# `gate.parity_accuracy_gap`) would refuse nearly every int8 graph.
INT8_ACCURACY_GAP = 0.002
# ... and its labels agree with the Keras model's on at least this share of them, so that
# labels flipping both ways cannot hide behind an unchanged accuracy.
INT8_AGREEMENT = 0.995


def int8_servable(parity: Parity | None) -> tuple[bool, str]:
    """Whether the int8 graph may be served (accuracy within INT8_ACCURACY_GAP of Keras',
    labels agreeing on INT8_AGREEMENT of the images), and the figures that say so. Never a
    reason to reject the model: the float graph is what `make serve` serves by default."""
    int8 = parity.int8 if parity is not None else None
    if int8 is None:
        return False, (
            "no int8 graph was measured (the version has none: trained before int8 graphs "
            "were made, or its graph could not be quantized; or its served model did not load)"
        )
    if int8.error or not int8.images:
        return False, f"the int8 graph could not be checked: {int8.error or 'no test images'}"
    gap = int8.served_accuracy - int8.keras_accuracy
    figures = (
        f"the int8 graph's labels differ on {int8.disagreements} of {int8.images} test images "
        f"(agreement {int8.agreement:.4f}), accuracy {int8.served_accuracy:.4f} vs "
        f"{int8.keras_accuracy:.4f} Keras ({gap:+.4f})"
    )
    if abs(gap) > INT8_ACCURACY_GAP + TOLERANCE:
        return False, f"{figures}: over {INT8_ACCURACY_GAP:g} apart, not servable"
    if int8.agreement + TOLERANCE < INT8_AGREEMENT:
        return False, f"{figures}: agreement below {INT8_AGREEMENT:g}, not servable"
    return True, f"{figures}: servable with --int8"


def _served_parity(candidate: Candidate, cfg: GateConfig) -> Rule:
    """What is served must answer as the model that was measured: the ONNX export's labels
    agree with the Keras model's on nearly every test image, and its accuracy is as close."""
    name, threshold = "served_parity", cfg.parity_agreement
    parity = candidate.parity
    if parity is None or parity.error or not parity.images:
        why = parity.error if parity and parity.error else "it was not checked"
        return Rule(name, False, None, threshold, f"the served model could not be checked: {why}")
    gap = parity.served_accuracy - parity.keras_accuracy
    figures = (
        f"labels differ on {parity.disagreements} of {parity.images} test images "
        f"(agreement {parity.agreement:.4f}), accuracy {parity.served_accuracy:.4f} "
        f"served vs {parity.keras_accuracy:.4f} Keras ({gap:+.4f}), probabilities "
        f"within {parity.max_difference:.2g}"
    )
    # The int8 graph's figures come last, never a reason to reject.
    int8 = f"; {int8_servable(parity)[1]}" if parity.int8 is not None else ""
    if parity.agreement + TOLERANCE < threshold:
        return Rule(
            name,
            False,
            parity.agreement,
            threshold,
            f"the served ONNX model's {figures}: agreement < {threshold:g}{int8}",
        )
    if abs(gap) > cfg.parity_accuracy_gap + TOLERANCE:
        return Rule(
            name,
            False,
            parity.agreement,
            threshold,
            f"the served ONNX model's {figures}: accuracy gap over "
            f"{cfg.parity_accuracy_gap:g}{int8}",
        )
    return Rule(name, True, parity.agreement, threshold, f"the served ONNX model's {figures}{int8}")


def _not_withdrawn(candidate: Candidate) -> Rule:
    """A version a rollback moved `champion` away from stays away: without this, the next
    `dvc repro` of the workspace that made it would promote it straight back."""
    return Rule(
        "not_withdrawn",
        False,
        candidate.withdrawn,
        "",
        f"withdrawn by a rollback ({candidate.withdrawn}); only `mnist-pipeline "
        "champion rollback --to` this version makes it champion again",
    )


def _incomparable(candidate: Candidate, champion: Champion) -> str:
    """Why candidate and champion cannot be compared image by image ('' if they can)."""
    if champion.test_sha256 != candidate.test_sha256:
        return (
            f"champion {_label(champion.version)} was scored on test set "
            f"{_short(champion.test_sha256)}, the candidate on "
            f"{_short(candidate.test_sha256)}; re-evaluate the champion on this test set"
        )
    a, b = np.asarray(candidate.correct), np.asarray(champion.correct)
    if a.ndim != 1 or a.shape != b.shape:
        return (
            f"per-image results have shapes {a.shape} (candidate) and {b.shape} "
            f"(champion {_label(champion.version)}): not the same test images"
        )
    return ""


def _beats_champion(
    candidate: Candidate, champion: Champion, cfg: GateConfig, mismatch: str
) -> Rule:
    name, threshold = "beats_champion", cfg.min_improvement
    if mismatch:
        return Rule(name, False, None, threshold, mismatch)
    if not _finite(candidate.accuracy):
        return Rule(
            name,
            False,
            None,
            threshold,
            f"candidate accuracy is missing or not finite ({candidate.accuracy!r})",
        )
    if not _finite(champion.accuracy):
        return Rule(
            name,
            False,
            None,
            threshold,
            f"champion {_label(champion.version)} has no finite accuracy "
            f"({champion.accuracy!r}); re-evaluate it",
        )
    ours, theirs = float(candidate.accuracy), float(champion.accuracy)  # type: ignore[arg-type]
    gain = ours - theirs
    versus = f"champion {_label(champion.version)} ({ours:.4f} vs {theirs:.4f})"
    if gain <= 0:
        detail = (
            f"ties {versus}; a tie never replaces the champion"
            if gain == 0
            else f"{gain:+.4f} against {versus}"
        )
        return Rule(name, False, gain, threshold, detail)
    if gain + TOLERANCE < threshold:
        return Rule(
            name,
            False,
            gain,
            threshold,
            f"{gain:+.4f} over {versus} < min_improvement {threshold:.4f}",
        )
    return Rule(
        name, True, gain, threshold, f"{gain:+.4f} over {versus} >= min_improvement {threshold:.4f}"
    )


def _evidence(candidate: Candidate, champion: Champion, robustness_gain: bool) -> Evidence:
    """The tests behind `significant` (the two test sets already known comparable); the
    corrupted suite counts only when both models were scored on the same one."""
    gains, losses, p_clean = mcnemar_exact(candidate.correct, champion.correct)
    paired = _suite_pair(candidate, champion)
    if not robustness_gain or paired is None:
        return Evidence(gains, losses, p_clean)
    gain, p_corrupted = paired_z_test(*paired)
    return Evidence(gains, losses, p_clean, gain, p_corrupted)


def _suite_pair(candidate: Candidate, champion: Champion) -> tuple[np.ndarray, np.ndarray] | None:
    """Both models' results on the corrupted suite, when both were scored on the same one
    (so they pair image by image); else None."""
    ours, theirs = candidate.corrupted_correct, champion.corrupted_correct
    if ours is None or theirs is None:
        return None
    if candidate.suite_sha256 != champion.suite_sha256 or ours.shape != theirs.shape:
        return None
    return ours, theirs


def _significant(
    evidence: Evidence | None,
    champion: Champion,
    level: float,
    decision: int | None,
    mismatch: str,
) -> Rule:
    if mismatch or evidence is None:
        return Rule("significant", False, None, level, mismatch)
    p = evidence.p
    # Significant *in the candidate's favour*: a clearly worse model differs significantly
    # too, and must not read as passing this rule.
    ok = p < level and evidence.favours_candidate
    counts = (
        f"{evidence.gains} images only the candidate gets right, {evidence.losses} only "
        f"champion {_label(champion.version)} does"
    )
    sign = "<" if p < level else ">="
    favour = "" if ok or p >= level else ", in the champion's favour"
    which = (
        f"level {level:.3g} (decision {decision} on this test set)"
        if decision
        else f"alpha {level:g}"
    )
    if evidence.p_corrupted is None:
        detail = f"McNemar exact {_p_is(p)} {sign} {which}{favour} ({counts})"
    else:
        detail = (
            f"Bonferroni {_p_is(p)} {sign} {which}{favour}, the better of two tests: "
            f"clean digits, McNemar exact {_p_is(evidence.p_clean)} ({counts}); "
            f"corrupted suite, mean accuracy {evidence.corrupted_gain:+.4f}, paired z-test "
            f"{_p_is(evidence.p_corrupted)}"
        )
    return Rule("significant", ok, p, level, detail)


def _calibrated(candidate: Candidate, ceiling: float) -> Rule:
    value = candidate.ece
    if not _finite(value):
        return Rule(
            "calibrated",
            False,
            value,
            ceiling,
            f"expected calibration error is missing or not finite ({value!r})",
        )
    assert value is not None  # _finite(None) is False
    ok = float(value) <= ceiling
    sign = "<=" if ok else ">"
    return Rule(
        "calibrated",
        ok,
        float(value),
        ceiling,
        f"test ECE after temperature scaling {value:.4f} {sign} max_ece {ceiling:.4f}",
    )


def _robust_vs_champion(candidate: Candidate, champion: Champion, margin: float) -> Rule:
    """Non-inferiority on the corrupted suite: the one-sided 95% lower bound of (candidate's
    mean corruption accuracy - champion's), paired image by image, must be above -margin.

    The 15 corruptions of one test image are not independent trials, so the interval is
    clustered by test image: each image contributes its mean difference over corruptions.
    """
    name = "robust_vs_champion"
    ours, theirs = candidate.corrupted_correct, champion.corrupted_correct
    if ours is None or theirs is None:
        who = "candidate" if ours is None else f"champion {_label(champion.version)}"
        return Rule(
            name,
            False,
            None,
            -margin,
            f"the {who} was not scored on the corrupted suite; run: dvc repro corrupt evaluate",
        )
    if _suite_pair(candidate, champion) is None:
        return Rule(
            name,
            False,
            None,
            -margin,
            f"the candidate was scored on corrupted suite {_short(candidate.suite_sha256)}"
            f" {ours.shape}, champion {_label(champion.version)} on "
            f"{_short(champion.suite_sha256)} {theirs.shape}: not the same images",
        )
    diff, se = paired_difference(ours, theirs)
    lower = diff - Z_95_ONE_SIDED * se
    mine, other = float(np.mean(ours)), float(np.mean(theirs))
    versus = (
        f"mean corruption accuracy {mine:.4f} vs champion {_label(champion.version)}'s "
        f"{other:.4f} ({diff:+.4f}; one-sided 95% lower bound {lower:+.4f}"
    )
    if lower > -margin:
        return Rule(name, True, lower, -margin, f"{versus} > -{margin:g} margin)")
    verdict = (
        "significantly less robust"
        if diff + Z_95_ONE_SIDED * se < 0
        else "not shown to be within the margin"
    )
    return Rule(name, False, lower, -margin, f"{verdict}: {versus} <= -{margin:g} margin)")


# --- helpers -------------------------------------------------------------------------------


def _finite(value: object) -> bool:
    if value is None or isinstance(value, (bool, np.bool_)):
        return False
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def _p_is(p: float | None) -> str:
    """'p=0.0350', 'p=2.1e-05', or 'p<1e-300' for a p-value too small to hold."""
    text = _fmt_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return p_text(p, ".4f" if p >= 1e-4 else ".1e")


def _label(version: str | None) -> str:
    """'3' -> 'v3'; anything already labelled or non-numeric is shown as it is."""
    text = str(version)
    return f"v{text}" if text.isdigit() else text


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else repr(digest)
