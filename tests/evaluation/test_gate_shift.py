"""The gate's rules beyond clean accuracy: robustness non-inferiority on the corrupted suite,
the calibration ceiling, and the significance level the test-set budget sets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import config as test_config

from mnist_pipeline.evaluation import reuse
from mnist_pipeline.evaluation.gate import Candidate, Champion, Parity, decide, summary_line
from mnist_pipeline.evaluation.scores import paired_difference, paired_z_test

N = 1000
PARITY = Parity(
    images=1000, disagreements=0, keras_accuracy=0.99, served_accuracy=0.99, max_difference=0.0
)
SHA, SUITE = "a" * 64, "s" * 64
CFG = test_config.section("gate")  # the defaults: every rule on
# The significance test on clean digits alone (no robustness gain as evidence).
CLEAN_ONLY = test_config.section("gate", robustness_gain=False)


def corrupted(accuracy: float, corruptions: int = 15, seed: int = 0) -> np.ndarray:
    """(corruptions, N) correctness with about `accuracy` right, in random places."""
    return np.random.default_rng(seed).random((corruptions, N)) < accuracy


def candidate(
    n_wrong: int = 10, *, robust: float = 0.95, ece: float = 0.004, **changes
) -> Candidate:
    correct = np.ones(N, dtype=bool)
    correct[:n_wrong] = False
    base = Candidate(
        accuracy=correct.mean(),
        loss=0.05,
        class_recall=[0.99] * 10,
        n_test=N,
        test_sha256=SHA,
        trained_test_sha256=SHA,
        correct=correct,
        parity=PARITY,
        ece=ece,
        corrupted_correct=corrupted(robust, seed=1),
        suite_sha256=SUITE,
    )
    return replace(base, **changes)


def champion(n_wrong: int = 30, *, robust: float = 0.95, **changes) -> Champion:
    correct = np.ones(N, dtype=bool)
    correct[:n_wrong] = False
    base = Champion(
        version="1",
        accuracy=correct.mean(),
        correct=correct,
        test_sha256=SHA,
        corrupted_correct=corrupted(robust, seed=2),
        suite_sha256=SUITE,
    )
    return replace(base, **changes)


def rule(verdict, name):
    return next(r for r in verdict.rules if r.name == name)


def test_corrupt_paired_difference_is_clustered_by_image():
    # Two corruptions; per image the differences are (1, 1), (0, 0), (-1, 1), (0, 0):
    # per-image means 1, 0, 0, 0 -> mean 0.25, sd 0.5, standard error 0.25.
    ours = np.array([[1, 0, 0, 1], [1, 0, 1, 1]], dtype=bool)
    theirs = np.array([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    diff, se = paired_difference(ours, theirs)
    assert diff == pytest.approx(0.25) and se == pytest.approx(0.25)
    with pytest.raises(ValueError, match="the same .groups, images. shape"):
        paired_difference(ours, theirs[:, :3])


def test_corrupt_robustness_rule_passes_an_equally_robust_candidate():
    verdict = decide(candidate(), champion(), CFG)
    robust = rule(verdict, "robust_vs_champion")
    assert robust.passed, robust.detail
    assert robust.threshold == -0.01 and robust.value > -0.01
    assert "one-sided 95% lower bound" in robust.detail and "> -0.01 margin" in robust.detail
    assert verdict.passed, verdict.reason


def test_corrupt_robustness_rule_rejects_a_cleaner_but_less_robust_candidate():
    """The scenario the rule exists for: better on clean digits (significantly), much worse
    on shifted ones."""
    verdict = decide(candidate(robust=0.75), champion(robust=0.89), CFG)
    assert rule(verdict, "beats_champion").passed and rule(verdict, "significant").passed
    robust = rule(verdict, "robust_vs_champion")
    assert not robust.passed and robust.value < -0.1
    assert robust.detail.startswith("significantly less robust: mean corruption accuracy")
    assert not verdict.passed and verdict.reason.startswith("robust_vs_champion: ")
    line = summary_line(verdict, "3", "1")
    assert line.startswith(
        "gate: REJECTED — v3 fails robust_vs_champion: significantly less robust"
    ) and line.endswith("champion stays v1")


def test_corrupt_robustness_margin_is_configurable_and_can_be_off():
    slightly_worse = candidate(robust=0.935)  # ~1.5 points below the champion's 0.95
    assert not rule(decide(slightly_worse, champion(), CFG), "robust_vs_champion").passed
    wide = test_config.section("gate", robustness_margin=0.05)
    assert rule(decide(slightly_worse, champion(), wide), "robust_vs_champion").passed
    off = test_config.section("gate", robustness_margin=None)
    assert "robust_vs_champion" not in [
        r.name for r in decide(slightly_worse, champion(), off).rules
    ]


def test_corrupt_robustness_needs_the_same_suite():
    verdict = decide(candidate(), champion(suite_sha256="z" * 64), CFG)
    assert not rule(verdict, "robust_vs_champion").passed
    assert "not the same images" in rule(verdict, "robust_vs_champion").detail
    missing = decide(candidate(), champion(corrupted_correct=None), CFG)
    assert (
        "champion v1 was not scored on the corrupted suite"
        in rule(missing, "robust_vs_champion").detail
    )


def test_calibration_ceiling_passes_and_rejects():
    ok = decide(candidate(ece=0.004), None, CFG)
    assert rule(ok, "calibrated").passed
    assert rule(ok, "calibrated").detail == (
        "test ECE after temperature scaling 0.0040 <= max_ece 0.0200"
    )
    bad = decide(candidate(ece=0.095), None, CFG)
    assert not bad.passed and bad.reason == (
        "calibrated: test ECE after temperature scaling 0.0950 > max_ece 0.0200"
    )
    missing = decide(candidate(ece=None), None, CFG)
    assert not rule(missing, "calibrated").passed
    assert "calibrated" not in [
        r.name
        for r in decide(candidate(ece=0.5), None, test_config.section("gate", max_ece=None)).rules
    ]


def test_reuse_budget_sets_the_significance_level():
    # 20 images fixed, none broken: p = 2 * 0.5**20 ~= 1.9e-6.
    strong = candidate(n_wrong=10)
    spent = reuse.budget([False] * 9, 0.05)  # the 10th decision: 0.05 / 110 ~= 4.5e-4
    verdict = decide(strong, champion(), CFG, budget=spent)
    assert verdict.passed and verdict.decision == 10
    assert verdict.level == pytest.approx(0.05 / 110)
    assert "(decision 10 on this test set)" in rule(verdict, "significant").detail
    assert verdict.to_dict()["level"] == pytest.approx(0.05 / 110)
    # 6 fixed, none broken: p = 2 * 0.5**6 ~= 0.031, enough at 0.05 but not at the 10th level.
    weak = candidate(n_wrong=24)
    at_alpha = test_config.section("gate", reuse=False, robustness_gain=False)
    assert decide(weak, champion(), at_alpha, budget=spent).passed
    late = decide(weak, champion(), CLEAN_ONLY, budget=spent)
    assert not late.passed and late.reason.startswith(
        "significant: McNemar exact p=0.0312 >= level 0.000455 (decision 10"
    )


def test_reuse_first_comparison_is_tested_at_half_alpha():
    verdict = decide(candidate(n_wrong=24), champion(), CLEAN_ONLY, budget=reuse.budget([], 0.05))
    assert verdict.decision == 1 and verdict.level == pytest.approx(0.025)
    assert not verdict.passed  # p = 0.031 >= 0.025: a first decision spends half the budget


def test_corrupt_paired_z_test_against_a_hand_computed_case():
    # The clustered example above: difference 0.25, standard error 0.25, so z = 1 and the
    # two-sided p = erfc(1 / sqrt(2)) = 0.3173.
    ours = np.array([[1, 0, 0, 1], [1, 0, 1, 1]], dtype=bool)
    theirs = np.array([[0, 0, 1, 1], [0, 0, 0, 1]], dtype=bool)
    diff, p = paired_z_test(ours, theirs)
    assert diff == pytest.approx(0.25) and p == pytest.approx(0.31731, abs=1e-5)
    assert paired_z_test(ours, ours) == (0.0, 1.0)


def test_corrupt_gain_is_evidence_when_the_clean_gain_alone_is_not():
    """A candidate a little better on clean digits (p = 0.031, not enough at the second
    decision's 0.0083) and much more robust (+2 points over 15,000 corrupted images) is
    promoted on the robustness gain; without `robustness_gain` it is not."""
    weak_but_robust = candidate(n_wrong=24, robust=0.97)
    second = reuse.budget([False], 0.05)
    verdict = decide(weak_but_robust, champion(robust=0.95), CFG, budget=second)
    significant = rule(verdict, "significant")
    assert verdict.passed, verdict.reason
    assert significant.value < 1e-10 and significant.threshold == pytest.approx(0.05 / 6)
    assert significant.detail.startswith("Bonferroni p=")
    assert "clean digits, McNemar exact p=0.0312" in significant.detail
    assert "corrupted suite, mean accuracy +0.0" in significant.detail
    assert ": clean p=0.0312, corrupted +0.0" in verdict.reason
    assert verdict.p_value == significant.value  # what the history and card record
    clean_only = decide(weak_but_robust, champion(robust=0.95), CLEAN_ONLY, budget=second)
    assert not clean_only.passed and clean_only.reason.startswith(
        "significant: McNemar exact p=0.0312 >= level 0.00833 (decision 2"
    )


def test_corrupt_gain_splits_the_level_between_the_two_tests():
    """Two chances to show a gain cost half the level each: a clean p of 0.031 passes at
    0.05 alone, but not with an equally robust candidate's corrupted test beside it."""
    weak = candidate(n_wrong=24)  # equally robust as the champion
    at_alpha = test_config.section("gate", reuse=False)
    both = decide(weak, champion(), at_alpha)
    assert not both.passed
    assert rule(both, "significant").value == pytest.approx(2 * 0.03125)
    alone = test_config.section("gate", reuse=False, robustness_gain=False)
    assert decide(weak, champion(), alone).passed


def test_corrupt_gain_in_the_champions_favour_is_no_evidence():
    """Equal on clean digits, significantly worse on the suite: the smallest p-value is the
    champion's, and it does not count for the candidate."""
    worse = candidate(n_wrong=30, robust=0.90)
    verdict = decide(worse, champion(robust=0.95), test_config.section("gate", reuse=False))
    significant = rule(verdict, "significant")
    assert not significant.passed
    assert "in the champion's favour" in significant.detail
    assert not rule(verdict, "robust_vs_champion").passed


def test_corrupt_gain_needs_the_same_suite():
    """A champion scored on another suite gives no corrupted evidence (the clean test alone,
    at the full level); the robustness rule refuses the pair."""
    verdict = decide(
        candidate(n_wrong=24, robust=0.97),
        champion(suite_sha256="z" * 64),
        test_config.section("gate", reuse=False),
    )
    significant = rule(verdict, "significant")
    assert significant.passed and significant.detail.startswith("McNemar exact p=0.0312 < ")
    assert not rule(verdict, "robust_vs_champion").passed


def test_corrupt_gain_too_significant_to_hold_is_shown_as_a_bound():
    """The normal tail underflows to 0.0 (z > 38): the reason says p<1e-300, not p=0."""
    verdict = decide(
        candidate(n_wrong=24, robust=0.99),
        champion(robust=0.5),
        test_config.section("gate", reuse=False),
    )
    assert verdict.passed and verdict.p_value == 0.0
    assert "(p<1e-300 < 0.05: clean p=0.0312, corrupted +0.4" in verdict.reason
    assert "paired z-test p<1e-300" in rule(verdict, "significant").detail
