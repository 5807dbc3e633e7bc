"""The promotion gate's rules, on crafted candidates and champions."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from helpers import config as test_config

from mnist_pipeline.evaluation.gate import (
    Candidate,
    Champion,
    Parity,
    decide,
    int8_servable,
    summary_line,
)

N = 1000
SHA = "a" * 64
OTHER_SHA = "b" * 64
# The rules on clean test images alone: the robustness, calibration and reuse rules have
# their own tests (test_gate_shift.py, test_reuse.py).
GATE = dict(
    min_accuracy=0.95,
    min_class_recall=0.90,
    min_improvement=0.0,
    require_significance=True,
    alpha=0.05,
    reuse=False,
    robustness_margin=None,
    max_ece=None,
)
CFG = test_config.section("gate", **GATE)


def correct_with(n_wrong: int, n: int = N) -> np.ndarray:
    """Per-image correctness with the first `n_wrong` images wrong."""
    out = np.ones(n, dtype=bool)
    out[:n_wrong] = False
    return out


def parity(disagreements: int = 0, served_accuracy: float = 0.97, **changes) -> Parity:
    """The served ONNX model against Keras (accuracy 0.97 on N images)."""
    return Parity(
        **{
            "images": N,
            "disagreements": disagreements,
            "keras_accuracy": 0.97,
            "served_accuracy": served_accuracy,
            "max_difference": 2e-6,
            **changes,
        }
    )


def candidate(n_wrong: int = 30, **changes) -> Candidate:
    base = Candidate(
        accuracy=(N - n_wrong) / N,
        loss=0.1,
        class_recall=[0.97] * 10,
        n_test=N,
        test_sha256=SHA,
        trained_test_sha256=SHA,
        correct=correct_with(n_wrong),
        parity=parity(),
    )
    return replace(base, **changes)


def champion(n_wrong: int = 30, **changes) -> Champion:
    base = Champion(
        version="2", accuracy=(N - n_wrong) / N, correct=correct_with(n_wrong), test_sha256=SHA
    )
    return replace(base, **changes)


def rule(verdict, name):
    matches = [r for r in verdict.rules if r.name == name]
    assert len(matches) == 1, [r.name for r in verdict.rules]
    return matches[0]


def failed_names(verdict):
    return [r.name for r in verdict.rules if not r.passed]


def test_first_run_without_champion_passes_on_six_rules():
    verdict = decide(candidate(), None, CFG)
    assert verdict.passed
    assert [r.name for r in verdict.rules] == [
        "test_set_nonempty",
        "metrics_present",
        "test_data_matches_training",
        "min_accuracy",
        "min_class_recall",
        "served_parity",
    ]
    assert verdict.p_value is None
    assert verdict.reason == "passed all 6 rules (no champion yet)"


def test_the_champion_re_checked_says_so():
    verdict = decide(candidate(), None, CFG, reigning=True)
    assert verdict.passed
    assert verdict.reason == "passed all 6 rules (already champion, re-checked)"
    assert summary_line(verdict, "2", "2") == (
        "gate: PASSED — v2 passed all 6 rules (already champion, re-checked); v2 stays champion"
    )


@pytest.mark.parametrize(
    "changes, failing, words",
    [
        ({"accuracy": math.nan}, "metrics_present", "accuracy (nan)"),
        ({"loss": None}, "metrics_present", "loss (None)"),
        ({"class_recall": None}, "metrics_present", "class_recall (None)"),
        ({"class_recall": [0.97] * 9}, "metrics_present", "9 values"),
        ({"class_recall": [0.97] * 9 + [math.nan]}, "metrics_present", "class_recall[9]"),
        ({"n_test": 0, "correct": np.zeros(0, dtype=bool)}, "test_set_nonempty", "empty"),
        ({"trained_test_sha256": OTHER_SHA}, "test_data_matches_training", "differs"),
        ({"trained_test_sha256": None}, "test_data_matches_training", "recorded no test set hash"),
        ({"accuracy": 0.941}, "min_accuracy", "0.9410 < 0.9500"),
        ({"class_recall": [0.97] * 8 + [0.87, 0.95]}, "min_class_recall", "class 8 recall 0.8700"),
        (
            {"parity": parity(disagreements=1)},
            "served_parity",
            "labels differ on 1 of 1000 test images (agreement 0.9990)",
        ),
        ({"parity": parity(served_accuracy=0.9694)}, "served_parity", "accuracy gap over 0.0005"),
        (
            {"parity": parity(error="could not load/predict models:/m-1")},
            "served_parity",
            "could not be checked: could not load/predict models:/m-1",
        ),
        ({"parity": None}, "served_parity", "it was not checked"),
    ],
)
def test_each_bad_candidate_fails_naming_the_rule(changes, failing, words):
    verdict = decide(candidate(**changes), None, CFG)
    assert not verdict.passed
    assert failed_names(verdict)[0] == failing
    assert verdict.reason.startswith(f"{failing}: ")
    assert words in verdict.reason
    assert len(verdict.rules) == 6  # every rule is recorded, not just the first failure


def test_nan_accuracy_fails_every_rule_that_needs_it_without_raising():
    verdict = decide(candidate(18, accuracy=math.nan), champion(), CFG)
    assert failed_names(verdict) == ["metrics_present", "min_accuracy", "beats_champion"]
    assert rule(verdict, "min_accuracy").value is not None  # the NaN is recorded...
    json.dumps(verdict.to_dict(), allow_nan=False)  # ...and serialised as null
    assert verdict.to_dict()["rules"][3]["value"] is None


def test_garbage_metric_values_fail_instead_of_raising():
    verdict = decide(candidate(accuracy="0.99", loss=True, class_recall=[None] * 10), None, CFG)
    assert {"metrics_present", "min_accuracy", "min_class_recall"} <= set(failed_names(verdict))


def test_worse_model_fails_beats_champion():
    verdict = decide(candidate(n_wrong=40), champion(n_wrong=30), CFG)
    assert failed_names(verdict)[0] == "beats_champion"
    beat = rule(verdict, "beats_champion")
    assert beat.value == pytest.approx(-0.01) and beat.threshold == 0.0
    assert "champion v2" in beat.detail
    # 10 images broken, none fixed: significantly different, but not in the candidate's favour
    sig = rule(verdict, "significant")
    assert not sig.passed and sig.value == pytest.approx(2 * 0.5**10)
    assert "in the champion's favour" in sig.detail


def test_tie_never_replaces_champion():
    verdict = decide(candidate(n_wrong=30), champion(n_wrong=30), CFG)
    beat = rule(verdict, "beats_champion")
    assert not beat.passed and beat.value == 0.0 and "tie" in beat.detail


def test_better_but_not_significant_fails_significance_only():
    # +2 correct images out of 1000: b=2, c=0, p = 2 * 0.5**2 = 0.5
    verdict = decide(candidate(n_wrong=28), champion(n_wrong=30), CFG)
    assert rule(verdict, "beats_champion").passed
    sig = rule(verdict, "significant")
    assert not sig.passed and sig.value == pytest.approx(0.5) and sig.threshold == 0.05
    assert failed_names(verdict) == ["significant"]
    assert verdict.p_value == pytest.approx(0.5)
    assert "0.5000 >= alpha 0.05" in verdict.reason


def test_clearly_better_model_passes_with_small_p():
    # 12 images fixed, none broken: p = 2 * 0.5**12 ~= 0.00049
    verdict = decide(candidate(n_wrong=18), champion(n_wrong=30), CFG)
    assert verdict.passed, verdict.reason
    assert verdict.p_value == pytest.approx(2 * 0.5**12)
    assert verdict.reason == "beats champion v2 by +0.0120 (p=0.0005 < 0.05)"
    assert len(verdict.rules) == 8


def test_significance_uses_per_image_disagreements_not_just_accuracy():
    # Same +12 net gain, but with 100 images broken and 112 fixed: not significant.
    cand = np.ones(N, dtype=bool)
    champ = np.ones(N, dtype=bool)
    cand[:100] = False  # candidate breaks 100 the champion got right
    champ[100:212] = False  # and fixes 112 the champion got wrong
    verdict = decide(
        candidate(accuracy=cand.mean(), correct=cand),
        champion(accuracy=champ.mean(), correct=champ),
        CFG,
    )
    assert rule(verdict, "beats_champion").passed
    assert not rule(verdict, "significant").passed
    assert verdict.p_value > 0.05


def test_min_improvement_is_enforced_with_float_tolerance():
    cfg = test_config.section(
        "gate",
        **{**GATE, "min_accuracy": 0.9, "min_improvement": 0.003, "require_significance": False},
    )
    exact = decide(candidate(n_wrong=62), champion(n_wrong=65), cfg)
    assert rule(exact, "beats_champion").value < 0.003  # 0.938 - 0.935 in binary floats...
    assert exact.passed  # ...still meets min_improvement
    short = decide(candidate(n_wrong=63), champion(n_wrong=65), cfg)
    assert not rule(short, "beats_champion").passed
    assert "< min_improvement 0.0030" in rule(short, "beats_champion").detail


def test_require_significance_false_skips_rule_but_keeps_p_value():
    cfg = test_config.section("gate", **{**GATE, "require_significance": False})
    verdict = decide(candidate(n_wrong=28), champion(n_wrong=30), cfg)
    assert verdict.passed
    assert "significant" not in [r.name for r in verdict.rules]
    assert verdict.p_value == pytest.approx(0.5)
    assert "significance not required" in verdict.reason


def test_champion_on_another_test_set_fails_comparison():
    verdict = decide(candidate(n_wrong=10), champion(test_sha256=OTHER_SHA), CFG)
    assert failed_names(verdict) == ["beats_champion", "significant"]
    assert "re-evaluate the champion" in rule(verdict, "beats_champion").detail
    assert verdict.p_value is None


def test_correct_length_mismatch_fails_instead_of_raising():
    verdict = decide(candidate(n_wrong=10), champion(correct=correct_with(30, n=999)), CFG)
    assert failed_names(verdict) == ["beats_champion", "significant"]
    assert "not the same test images" in rule(verdict, "significant").detail


def test_to_dict_is_strict_json():
    verdict = decide(candidate(n_wrong=28, loss=math.nan), champion(n_wrong=30), CFG)
    data = verdict.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["passed"] is False
    assert [r["name"] for r in data["rules"]] == [r.name for r in verdict.rules]
    assert isinstance(data["p_value"], float)


def test_summary_lines():
    passed = decide(candidate(n_wrong=18), champion(n_wrong=30), CFG)
    assert summary_line(passed, "3", "2") == (
        "gate: PASSED — v3 beats champion v2 by +0.0120 (p=0.0005 < 0.05); v3 is now champion"
    )
    rejected = decide(candidate(accuracy=0.941), champion(n_wrong=30), CFG)
    line = summary_line(rejected, "3", "2")
    assert line.startswith("gate: REJECTED — v3 fails min_accuracy: 0.9410 < 0.9500")
    assert "more failing rule" in line and line.endswith("; champion stays v2")
    first = summary_line(decide(candidate(), None, CFG), "1", None)
    assert first == "gate: PASSED — v1 passed all 6 rules (no champion yet); v1 is now champion"
    unregistered = summary_line(decide(candidate(parity=parity(3)), None, CFG), None, None)
    assert unregistered.startswith("gate: REJECTED — the candidate fails served_parity")
    assert unregistered.endswith("; no champion yet")


def test_a_version_withdrawn_by_a_rollback_is_not_promoted_back():
    """It would beat the champion it was rolled back to; the rollback's mark keeps it out."""
    why = "2026-11-29T14:00:00Z ana: champion moved to v2: v3 misreads sevens"
    verdict = decide(candidate(10, withdrawn=why), champion(30), CFG)
    assert not verdict.passed and failed_names(verdict) == ["not_withdrawn"]
    assert rule(verdict, "not_withdrawn").value == why
    assert verdict.reason.startswith(f"not_withdrawn: withdrawn by a rollback ({why})")
    assert "not_withdrawn" not in [r.name for r in decide(candidate(10), champion(30), CFG).rules]


def test_onnx_parity_rule_passes_within_both_bounds():
    """99.95% agreement and 0.05 points of accuracy: the issue's bounds, met exactly."""
    many = 10_000
    ok = parity(disagreements=5, images=many, served_accuracy=0.9705)
    verdict = decide(candidate(parity=ok), None, CFG)
    rule_ = rule(verdict, "served_parity")
    assert rule_.passed and rule_.value == pytest.approx(0.9995) and rule_.threshold == 0.9995
    assert (
        "labels differ on 5 of 10000 test images (agreement 0.9995), accuracy 0.9705 "
        "served vs 0.9700 Keras (+0.0005)" in rule_.detail
    )
    six = decide(candidate(parity=parity(disagreements=6, images=many)), None, CFG)
    assert not six.passed and six.reason.startswith(
        "served_parity: the served ONNX model's labels differ on 6 of 10000 test images"
    )


def test_int8_parity_is_reported_beside_the_served_graph_and_never_rejects():
    """The int8 graph's figures follow the float graph's in the parity rule; a gap of 0.2
    points or less makes it servable, a larger one does not, and neither moves the verdict."""
    close = parity(int8=parity(disagreements=4, served_accuracy=0.9685))  # -0.0015
    far = parity(int8=parity(disagreements=30, served_accuracy=0.9670))  # -0.0030
    # Six labels flip, three each way: the accuracy does not move, the agreement does.
    torn = parity(int8=parity(disagreements=6, served_accuracy=0.97))
    broken = parity(int8=parity(error="could not run it: bad graph"))
    for int8, servable, said in (
        (close, True, "(-0.0015): servable with --int8"),
        (far, False, "(-0.0030): over 0.002 apart, not servable"),
        (
            torn,
            False,
            "(agreement 0.9940), accuracy 0.9700 vs 0.9700 Keras (+0.0000): "
            "agreement below 0.995, not servable",
        ),
        (broken, False, "the int8 graph could not be checked: could not run it: bad graph"),
    ):
        verdict = decide(candidate(parity=int8), None, CFG)
        assert verdict.passed, verdict.reason
        assert rule(verdict, "served_parity").detail.endswith(said)
        assert int8_servable(int8)[0] is servable
        assert said in int8_servable(int8)[1]
    assert "int8 graph's labels differ on 30 of" in int8_servable(far)[1]
    # A failing float graph still rejects, with the int8 figures after its reason.
    bad = decide(candidate(parity=replace(far, disagreements=6, images=10_000)), None, CFG)
    assert not bad.passed and "agreement < 0.9995; the int8 graph's" in bad.reason
    assert int8_servable(parity()) == (False, int8_servable(None)[1])
    assert int8_servable(None)[1].startswith("no int8 graph was measured (the version has none")
    assert "int8" not in rule(decide(candidate(), None, CFG), "served_parity").detail
    # Only the gate may write the verdict's tags on a team server with logins.
    from mnist_pipeline.team.release_gate import RESERVED_TAG_PREFIXES
    from mnist_pipeline.tracking import registry

    assert registry.INT8_SERVABLE.startswith(RESERVED_TAG_PREFIXES)
    assert registry.INT8_PARITY.startswith(RESERVED_TAG_PREFIXES)
