"""An honest test set: the chance of ever promoting a challenger that is no better than the
champion stays at `alpha`, however many decisions reuse the same test images.

Every gate decision that compares a challenger with the champion tests one hypothesis ("the
challenger is no better") on the same 10,000 test images. At a fixed level alpha for each,
the chance that some no-better challenger passes grows with every experiment. The gate
instead spends alpha over the sequence of decisions on one test set (identified by its
SHA-256), with the online fallback procedure (Tian & Ramdas 2021, "Online control of the
familywise error rate"): decision i is tested at

    alpha_i = alpha * gamma_i + (alpha_{i-1} if decision i-1 promoted its challenger else 0)

with gamma_i = 1 / (i (i + 1)), which sums to 1. The familywise error rate (the chance of any
false promotion, over the whole infinite sequence) is at most alpha under any dependence
between the decisions, which matters here: they share the test images and often the
champion. After k decisions, alpha / (k + 1) of the budget is still unspent, and a promotion
hands its own level on to the next decision, so a real improvement does not make the next
one harder to pass. docs/gate.md works through the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def gamma(i: int) -> float:
    """The share of alpha decision i (1, 2, ...) gets of its own: 1/2, 1/6, 1/12, ..."""
    if i < 1:
        raise ValueError(f"decision number: got {i}, expected an integer >= 1")
    return 1.0 / (i * (i + 1))


@dataclass(frozen=True)
class Budget:
    """Where the sequence of decisions on one test set stands."""

    alpha: float  # the familywise false-promotion rate held over every decision
    decisions: int  # comparisons with a champion already made on this test set
    level: float  # the significance level the next decision is tested at
    levels: tuple[float, ...]  # the level each past decision was tested at, in order

    @property
    def unspent(self) -> float:
        """alpha times the share of gamma not yet given out: alpha / (decisions + 1)."""
        return self.alpha / (self.decisions + 1)

    def describe(self) -> str:
        return (
            f"{self.decisions} decision{'s' if self.decisions != 1 else ''} on this test "
            f"set; the next is tested at {self.level:.3g} (alpha {self.alpha:g} over the "
            f"sequence, {self.unspent:.3g} unspent)"
        )


def budget(promoted: Iterable[bool], alpha: float) -> Budget:
    """The budget after past decisions, given whether each promoted its challenger."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: got {alpha!r}, expected a number in (0, 1)")
    levels: list[float] = []
    carried = 0.0
    for i, won in enumerate(promoted, start=1):
        levels.append(alpha * gamma(i) + carried)
        carried = levels[-1] if won else 0.0
    count = len(levels)
    return Budget(
        alpha=alpha, decisions=count, level=alpha * gamma(count + 1) + carried, levels=tuple(levels)
    )


def decisions_on(entries: Iterable[Mapping[str, Any]], test_sha256: str) -> list[bool]:
    """Whether each past comparison on test set `test_sha256` promoted its challenger, in
    order, from promotion-history entries (`tracking.history`).

    A comparison is a gate decision with a p-value (a champion on the same test set was
    there to compare with); first promotions, re-checks of the champion and moves by hand
    test nothing. Entries written before the test set was recorded in them name it in their
    `test_data_matches_training` rule.
    """
    out = []
    for entry in entries:
        if entry.get("action") != "gate" or entry.get("p_value") is None:
            continue
        if test_set(entry) == test_sha256:
            out.append(entry.get("outcome") == "promoted")
    return out


def test_set(entry: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the test set a history entry's decision was made on, if it says."""
    if entry.get("test_sha256"):
        return str(entry["test_sha256"])
    for rule in entry.get("rules") or []:
        if rule.get("rule") == "test_data_matches_training":
            return str(rule.get("value"))
    return None
