"""Moving `champion` by hand: a guarded rollback, or a forced promotion, and its record.

A rollback may only return the alias to a version that passed the gate before and was
scored on the test set in use today: a version that never passed, or whose test-set hash
differs, is refused with the reason. `force` skips those two checks for exceptional cases.
Either way the move happens under the gate's own promotion lock, and the history records
who, when, why and what was checked (or that it was forced). The version moved away from is
marked withdrawn, so the gate does not promote it straight back when its workspace next runs
`dvc repro`; moving the alias back to it by hand lifts the mark.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PromotionError
from ..tracking import history, locks, registry

# A version's tag with the SHA-256 of the test set it was scored on, set at registration.
TEST_SHA256_TAG = "data.test_sha256"
WITHDRAWN_CHARS = 500


@dataclass(frozen=True)
class Move:
    version: str
    champion_before: str | None
    sequence: int  # the history entry that records it
    forced: bool
    checks: list[str]

    def line(self, name: str) -> str:
        before = f"v{self.champion_before}" if self.champion_before else "no champion"
        how = "forced by hand" if self.forced else "rolled back"
        return (
            f"champion: {name} v{self.version} ({how}; was {before}); history entry {self.sequence}"
        )


def version_number(text: str) -> str:
    """'v3' or '3' -> '3'."""
    number = text[1:] if text[:1] in ("v", "V") else text
    if not number.isdigit() or int(number) < 1:
        raise PromotionError(f"--to {text!r}: expected a version such as v3 or 3")
    return str(int(number))


def passed_before(number: str, tags: dict[str, str], entries: list[dict]) -> bool:
    """Whether version `number` (with registry tags `tags`) passed a gate: a passing decision
    in the history, or (for versions gated before the history existed) its `gate.passed`
    tag."""
    if any(
        e.get("action") == "gate"
        and e.get("candidate") == number
        and e.get("outcome") in (history.PROMOTED, history.KEPT)
        for e in entries
    ):
        return True
    return tags.get("gate.passed") == "true"


def move(
    name: str,
    to: str,
    reason: str,
    *,
    test_sha256: str | None,
    force: bool = False,
    lock_url: str | None = None,
) -> Move:
    """Move `name`'s champion to version `to` (see the module docstring); `test_sha256` is
    the hash of today's test split (None: unknown, which refuses an unforced move)."""
    if not reason.strip():
        raise PromotionError("--reason: got an empty reason; say why the champion moves")
    number = version_number(to)
    with locks.held("registry", lock_url) as lock:
        target = registry.version(name, number)
        if target is None:
            raise PromotionError(
                f"{name} has no version {number}; see: mnist-pipeline champion history"
            )
        current = registry.champion(name)
        before = str(current.version) if current is not None else None
        if before == number:
            raise PromotionError(f"v{number} is already the champion of {name}; nothing moved")
        checks = _checks(name, number, target.tags, test_sha256, force)
        lock.check()  # the checks stand only while no one else can move the alias
        registry.promote(name, number)
        entry = history.move_entry(
            forced=force,
            candidate=number,
            champion_before=before,
            reason=reason.strip(),
            checks=checks,
        )
        # The version left behind stays out until someone moves the alias back to it.
        if registry.WITHDRAWN in target.tags:
            registry.delete_version_tag(name, number, registry.WITHDRAWN)
        if before is not None:
            registry.set_version_tags(
                name,
                before,
                {
                    registry.WITHDRAWN: (
                        f"{entry['time']} {entry['user']}: champion moved to v{number}: "
                        f"{reason.strip()}"
                    )[:WITHDRAWN_CHARS]
                },
            )
        sequence = history.append(name, entry)
    return Move(
        version=number, champion_before=before, sequence=sequence, forced=force, checks=checks
    )


def _checks(
    name: str, number: str, tags: dict[str, str], today: str | None, force: bool
) -> list[str]:
    """What the move was checked against; raises `PromotionError` on a refusal (unforced)."""
    passed = passed_before(number, tags, history.entries(name))
    scored_on = tags.get(TEST_SHA256_TAG)
    same_test = bool(scored_on) and scored_on == today
    if force:
        return [
            f"forced: passed the gate before: {'yes' if passed else 'no'}; "
            f"test set as today's: {'yes' if same_test else 'no'}"
        ]
    if not passed:
        raise PromotionError(
            f"v{number} of {name} never passed the gate, so it cannot be rolled "
            "back to; to promote it anyway: --force --reason '...'"
        )
    if not same_test:
        raise PromotionError(
            f"v{number} of {name} was scored on test set {_short(scored_on)}, today's is "
            f"{_short(today)}: its verdict does not hold for today's data; re-evaluate it, or "
            "--force --reason '...'"
        )
    return ["passed the gate before", f"test set {_short(today)} as today's"]


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "unknown"
