"""An honest test set: the levels of the online fallback procedure by hand, how decisions are
counted from the promotion history, and a simulation of 200 challengers on one test set."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import config as test_config

from mnist_pipeline.evaluation import gate, reuse
from mnist_pipeline.evaluation.gate import Parity

PARITY = Parity(
    images=1000, disagreements=0, keras_accuracy=0.99, served_accuracy=0.99, max_difference=0.0
)
SHA = "t" * 64


def test_reuse_levels_by_hand():
    first = reuse.budget([], 0.05)
    assert first.decisions == 0 and first.level == pytest.approx(0.025)  # alpha / (1 * 2)
    after_reject = reuse.budget([False], 0.05)
    assert after_reject.levels == pytest.approx((0.025,))
    assert after_reject.level == pytest.approx(0.05 / 6)  # alpha / (2 * 3)
    after_promotion = reuse.budget([True], 0.05)  # its level carries
    assert after_promotion.level == pytest.approx(0.05 / 6 + 0.025)
    chain = reuse.budget([True, True, False], 0.05)
    assert chain.levels == pytest.approx((0.025, 0.025 + 0.05 / 6, 0.025 + 0.05 / 6 + 0.05 / 12))
    assert chain.level == pytest.approx(0.05 / 20)
    assert chain.unspent == pytest.approx(0.05 / 4)
    assert "3 decisions on this test set; the next is tested at 0.0025" in chain.describe()
    with pytest.raises(ValueError, match="alpha: got 1.5"):
        reuse.budget([], 1.5)


def test_reuse_counts_only_comparisons_on_the_same_test_set():
    old_format = {
        "action": "gate",
        "outcome": "rejected",
        "p_value": 0.2,
        "rules": [{"rule": "test_data_matches_training", "value": SHA}],
    }
    entries = [
        {"action": "gate", "outcome": "promoted", "p_value": None, "test_sha256": SHA},  # first
        {"action": "gate", "outcome": "promoted", "p_value": 1e-9, "test_sha256": SHA},
        old_format,
        {"action": "rollback", "outcome": "rolled back", "p_value": None},
        {"action": "gate", "outcome": "kept", "p_value": None, "test_sha256": SHA},  # re-check
        {"action": "gate", "outcome": "rejected", "p_value": 0.01, "test_sha256": "u" * 64},
        {"action": "gate", "outcome": "rejected", "p_value": 0.3, "test_sha256": SHA},
    ]
    assert reuse.decisions_on(entries, SHA) == [True, False, False]
    assert reuse.decisions_on(entries, "u" * 64) == [False]


# --- the simulation ------------------------------------------------------------------------

N = 10_000
CFG = test_config.section(
    "gate",
    min_accuracy=0.5,
    min_class_recall=0.0,
    min_improvement=0.0,
    require_significance=True,
    alpha=0.05,
    reuse=True,
    robustness_margin=None,
    max_ece=None,
)
NAIVE = test_config.section("gate", **{**CFG.model_dump(), "reuse": False})


def _difficulty(rng: np.random.Generator) -> np.ndarray:
    """Per test image, the chance a model of the population gets it right: most are easy,
    3% are hard, so models agree on most images and differ on the hard ones (99.0% mean)."""
    p = np.full(N, 0.9985)
    hard = rng.choice(N, size=N * 3 // 100, replace=False)
    p[hard] = 0.7155
    return p


def _model(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rng.random(N) < p


def _decide(
    cfg,
    challenger: np.ndarray,
    champion: np.ndarray,
    promoted: list[bool],
    corrupted: tuple[np.ndarray, np.ndarray] | None = None,
):
    """`corrupted`: the challenger's and the champion's (corruptions, N) correctness on one
    suite, or None for none."""
    ours, theirs = corrupted or (None, None)
    suite = None if corrupted is None else "c" * 64
    candidate = gate.Candidate(
        accuracy=float(challenger.mean()),
        loss=0.05,
        class_recall=[1.0] * 10,
        n_test=N,
        test_sha256=SHA,
        trained_test_sha256=SHA,
        correct=challenger,
        parity=PARITY,
        corrupted_correct=ours,
        suite_sha256=suite,
    )
    holder = gate.Champion(
        version="1",
        accuracy=float(champion.mean()),
        correct=champion,
        test_sha256=SHA,
        corrupted_correct=theirs,
        suite_sha256=suite,
    )
    return gate.decide(candidate, holder, cfg, budget=reuse.budget(promoted, cfg.alpha))


def _sequence(cfg, rng: np.random.Generator, challengers: int, corruptions: int = 0) -> int:
    """Challengers of the champion's true accuracy, gated one after another; a promoted one
    becomes the champion. Returns how many were promoted (every one a false promotion).
    `corruptions` > 0: each model is also scored on a corrupted suite of that many
    corruptions of the test images (same quality there too), which the gate may count."""
    p = _difficulty(rng)
    shifted = rng.uniform(0.5, 1.0, size=(corruptions, N))  # per corrupted image
    champion = _model(p, rng)
    champion_shifted = rng.random(shifted.shape) < shifted
    promoted: list[bool] = []
    for _ in range(challengers):
        challenger = _model(p, rng)
        challenger_shifted = rng.random(shifted.shape) < shifted
        both = (challenger_shifted, champion_shifted) if corruptions else None
        won = _decide(cfg, challenger, champion, promoted, both).passed
        promoted.append(won)
        if won:
            champion, champion_shifted = challenger, challenger_shifted
    return sum(promoted)


@pytest.mark.slow
def test_reuse_simulation_holds_false_promotions_to_alpha():
    """200 sequences of 200 same-quality challengers: with the budget, at most 5% of the
    sequences promote any challenger at all. At a fixed 0.05 per decision, several times as
    many do: each sequence whose champion was an unlucky draw (a little worse on the hard
    images than the population it came from) is overtaken by the first lucky challenger."""
    rng = np.random.default_rng(2026)
    with_budget = [_sequence(CFG, rng, 200) for _ in range(200)]
    assert np.mean([count > 0 for count in with_budget]) <= 0.05
    naive = [_sequence(NAIVE, rng, 200) for _ in range(100)]
    assert np.mean([count > 0 for count in naive]) >= 3 * 0.05


@pytest.mark.slow
def test_reuse_simulation_still_promotes_a_really_better_model():
    """After 199 same-quality challengers were rejected, the 200th decision is tested at
    0.05 / (200 * 201) = 1.2e-6; a model that avoids 80% of the errors on hard images
    (99.0% -> 99.67%, two thirds fewer errors) still passes in at least 90% of runs (94 of
    these 100)."""
    rng = np.random.default_rng(7)
    passed = 0
    runs = 100
    for _ in range(runs):
        p = _difficulty(rng)
        champion = _model(p, rng)
        better = _model(np.where(p < 0.9, p + 0.8 * (1 - p), p), rng)
        verdict = _decide(CFG, better, champion, [False] * 199)
        assert verdict.decision == 200 and verdict.level == pytest.approx(0.05 / (200 * 201))
        passed += verdict.passed
    assert passed / runs >= 0.9


@pytest.mark.slow
def test_reuse_simulation_with_the_corrupted_suite_as_evidence_holds_alpha():
    """With `robustness_gain`, a challenger may show it is better on clean digits or on the
    corrupted suite, each at half the decision's level. 100 sequences of 100 same-quality
    challengers (same quality on both) still promote any at all in at most 5% of the
    sequences; at a fixed 0.05 per decision they do far more often."""
    rng = np.random.default_rng(2027)
    gain = test_config.section("gate", **{**CFG.model_dump(), "robustness_gain": True})
    with_budget = [_sequence(gain, rng, 100, corruptions=3) for _ in range(100)]
    assert np.mean([count > 0 for count in with_budget]) <= 0.05
    naive_gain = test_config.section("gate", **{**gain.model_dump(), "reuse": False})
    naive = [_sequence(naive_gain, rng, 100, corruptions=3) for _ in range(50)]
    assert np.mean([count > 0 for count in naive]) >= 3 * 0.05
