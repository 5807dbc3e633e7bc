"""The promotion history: every decision on a registered model's `champion`, in the registry.

Each entry is one registered-model tag, `champion.history.<sequence>` -> compact JSON, so the
history lives wherever the registry does (the embedded SQLite store or the team server) and
needs no other database. Sequence numbers are zero-padded to sort as text and are allocated
as "one more than the highest": callers append while holding the promotion lock
(`locks.held("registry", ...)`), so two gates never take the same number and the numbers
follow the order in which the decisions were made.

MLflow's `registered_model_tags.value` column is `VARCHAR(5000)` (PostgreSQL enforces it,
SQLite does not; the client-side check allows more), so an entry is kept under 5,000
characters: long texts are shortened, never the numbers.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import socket
from collections.abc import Mapping
from typing import Any

from ..files import json_safe
from . import lineage
from .store import retry

PREFIX = "champion.history."
DIGITS = 6
MAX_CHARS = 5000  # registered_model_tags.value is VARCHAR(5000)
TEXT_CHARS = (600, 160, 60)  # successive limits on long texts until an entry fits

# Outcomes of the gate, and of the manual moves.
PROMOTED, KEPT, REJECTED = "promoted", "kept", "rejected"
ROLLED_BACK, FORCED = "rolled back", "forced"


def context() -> dict[str, Any]:
    """Who decides, when and from where: UTC time, user (and their login on a team server
    with logins), host, git commit and dirty flag of
    the working directory, and the DVC experiment (inside `dvc exp run`)."""
    commit = lineage.git_commit()
    login = os.environ.get("MLFLOW_TRACKING_USERNAME")  # the server's login, when it has logins
    return {
        "time": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "user": _user(),
        **({"login": login} if login else {}),
        "host": socket.gethostname(),
        "git_commit": commit,
        "git_dirty": lineage.git_dirty(None, commit),
        "dvc_experiment": lineage.dvc_experiment().get("dvc.experiment"),
    }


def gate_entry(
    verdict: Mapping[str, Any],
    *,
    candidate: str,
    champion_before: str | None,
    champion_after: str | None,
    run_id: str,
    test_sha256: str | None = None,
) -> dict[str, Any]:
    """An entry for one gate decision; `verdict` is `gate.Verdict.to_dict()`, with the
    significance level it tested at and its number among the decisions on `test_sha256`."""
    if not verdict["passed"]:
        outcome = REJECTED
    else:
        outcome = KEPT if champion_before == candidate else PROMOTED
    return {
        **context(),
        "action": "gate",
        "outcome": outcome,
        "candidate": candidate,
        "champion_before": champion_before,
        "champion_after": champion_after,
        "run_id": run_id,
        "p_value": verdict.get("p_value"),
        "test_sha256": test_sha256,
        "level": verdict.get("level"),
        "decision": verdict.get("decision"),
        "rules": [
            {
                "rule": r["name"],
                "passed": r["passed"],
                "value": r["value"],
                "threshold": r["threshold"],
            }
            for r in verdict["rules"]
        ],
        "reason": verdict["reason"],
    }


def move_entry(
    *, forced: bool, candidate: str, champion_before: str | None, reason: str, checks: list[str]
) -> dict[str, Any]:
    """An entry for a move by hand (`champion rollback`): why, and what was checked."""
    return {
        **context(),
        "action": "force" if forced else "rollback",
        "outcome": FORCED if forced else ROLLED_BACK,
        "candidate": candidate,
        "champion_before": champion_before,
        "champion_after": candidate,
        "checks": checks,
        "reason": reason,
    }


def append(name: str, entry: Mapping[str, Any]) -> int:
    """Record `entry` as the next entry of `name`'s history; returns its sequence number.

    Call it while holding the promotion lock: the number is read-then-written.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    sequence = max((seq for seq, _ in _tagged(client, name)), default=0) + 1
    key = f"{PREFIX}{sequence:0{DIGITS}d}"
    value = encode(entry)
    retry(lambda: client.set_registered_model_tag(name, key, value))
    return sequence


def entries(name: str) -> list[dict[str, Any]]:
    """Every entry of `name`'s history, oldest first, each with its `seq`; [] for a model
    that does not exist or has none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        tagged = _tagged(MlflowClient(), name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    out = []
    for sequence, value in sorted(tagged):
        try:
            entry = json.loads(value)
        except ValueError:
            entry = {"outcome": "unreadable", "reason": value[:200]}
        out.append({"seq": sequence, **entry})
    return out


def encode(entry: Mapping[str, Any]) -> str:
    """Compact JSON of `entry`, under `MAX_CHARS`: long texts are shortened until it fits."""
    safe = json_safe(dict(entry))
    text = _dumps(safe)
    for limit in TEXT_CHARS:
        if len(text) <= MAX_CHARS:
            break
        safe = _shorten(safe, limit)
        text = _dumps(safe)
    if len(text) > MAX_CHARS:
        raise ValueError(
            f"history entry: {len(text)} characters even with short texts, "
            f"over the registry's {MAX_CHARS}"
        )
    return text


def _tagged(client: Any, name: str) -> list[tuple[int, str]]:
    tags = retry(lambda: client.get_registered_model(name)).tags
    return [
        (int(key[len(PREFIX) :]), value)
        for key, value in tags.items()
        if key.startswith(PREFIX) and key[len(PREFIX) :].isdigit()
    ]


def _dumps(entry: Any) -> str:
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _shorten(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 1] + "…"
    if isinstance(value, list):
        return [_shorten(item, limit) for item in value]
    if isinstance(value, dict):
        return {key: _shorten(item, limit) for key, item in value.items()}
    return value


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no $USER (a bare container)
        return "unknown"
