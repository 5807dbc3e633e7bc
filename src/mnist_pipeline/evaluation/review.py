"""The review report: what a change does, as Markdown a CI job can post on a pull request.

It compares the workspace (or one DVC experiment) with a git revision: the params that
changed (`dvc params diff`), the metrics with their deltas (`dvc metrics diff --all`;
per-class ones folded, unchanged ones counted), the gate's verdict and reason from
`gate.json` on both sides, and where the plots are. DVC does the comparing; this module only
reads its JSON and writes the text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import ReviewError
from .card import markdown_table

DVC_TIMEOUT_S = 300
GATE_FILE = "gate.json"  # dvc.yaml's ${paths.gate}, read from params.yaml when it is there


def report(
    root: str | os.PathLike[str], *, against: str = "main", experiment: str | None = None
) -> str:
    """The Markdown report for the workspace at `root` (or `experiment`) against `against`."""
    root = Path(root)
    revs = [against, *([experiment] if experiment else [])]
    subject = f"experiment `{experiment}`" if experiment else "the workspace"
    params = _dvc(root, "params", "diff", *revs)
    metrics = _dvc(root, "metrics", "diff", "--all", *revs)
    gate_path = _gate_path(root)
    lines = [f"## Review: {subject} against `{against}`", ""]
    lines += _params_section(params)
    lines += _metrics_section(metrics, gate_path)
    lines += _gate_section(
        _gate(root, gate_path, against), _gate(root, gate_path, experiment), against, subject
    )
    lines += _plots_section(root, against, experiment)
    return "\n".join(lines).rstrip() + "\n"


# --- DVC and git ---------------------------------------------------------------------------


def _dvc(root: Path, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "dvc", *args, "--json"]
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=DVC_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ReviewError(f"dvc {' '.join(args)}: {err}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ReviewError(
            f"dvc {' '.join(args)} failed in {root}: {why} (is the revision or "
            "experiment name right? see: dvc exp list)"
        )
    try:
        return json.loads(done.stdout or "{}")
    except ValueError:
        raise ReviewError(f"dvc {' '.join(args)}: output is not JSON") from None


def _gate_path(root: Path) -> str:
    try:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        return str(params["paths"]["gate"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return GATE_FILE


def _gate(root: Path, path: str, rev: str | None) -> dict[str, Any] | None:
    """gate.json in the workspace (rev None) or at `rev` (a git revision or experiment)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        if rev is None:
            text = (root / path).read_text(encoding="utf-8")
        else:
            text = dvc.api.read(path, repo=str(root), rev=rev)
        data = json.loads(text)
    except (OSError, ValueError, DvcException):  # not there, or not JSON: no verdict
        return None
    return data if isinstance(data, dict) else None


# --- sections ------------------------------------------------------------------------------


def _params_section(diff: dict[str, Any]) -> list[str]:
    rows = [
        (f"`{name}`", _plain(change.get("old")), _plain(change.get("new")))
        for changes in diff.values()
        for name, change in sorted(changes.items())
    ]
    out = ["### Params that changed", ""]
    if not rows:
        return out + ["None.", ""]
    return out + _table(("param", "before", "after"), rows)


def _metrics_section(diff: dict[str, Any], gate_path: str) -> list[str]:
    """Every headline metric with before, after and delta; nested ones (per class, the data
    report) in a folded table when they changed, else only counted."""
    headline: list[tuple[str, ...]] = []
    nested: list[tuple[str, ...]] = []
    unchanged: dict[str, int] = {}
    for file, metrics in sorted(diff.items()):
        if Path(file) == Path(gate_path):
            continue  # the verdict has its own section
        for name, change in sorted(metrics.items()):
            old, new = change.get("old"), change.get("new")
            if not (_number(old) or _number(new)):
                continue
            if "." in name and old == new:
                unchanged[file] = unchanged.get(file, 0) + 1
                continue
            delta = new - old if _number(old) and _number(new) else None
            row = (
                f"`{name}`",
                _fmt(old),
                _fmt(new),
                "" if delta is None else f"{delta:+.4f}",
                file,
            )
            (nested if "." in name else headline).append(row)
    out = ["### Metrics", ""]
    if not (headline or nested or unchanged):
        return out + ["No metrics on either side (run the pipeline: dvc repro).", ""]
    header = ("metric", "before", "after", "delta", "file")
    if headline:
        out += _table(header, headline)
    if nested:
        out += [
            f"<details><summary>{len(nested)} more changed metrics (per class, ...)</summary>",
            "",
            *_table(header, nested),
            "</details>",
            "",
        ]
    if unchanged:
        counts = ", ".join(f"{count} in `{file}`" for file, count in unchanged.items())
        out += [f"Unchanged: {counts}.", ""]
    return out


def _gate_section(before: dict | None, after: dict | None, against: str, subject: str) -> list[str]:
    out = ["### Gate verdict", ""]
    for label, gate in ((subject[0].upper() + subject[1:], after), (f"`{against}`", before)):
        if gate is None:
            out.append(f"- {label}: no gate.json (evaluate has not run there)")
            continue
        verdict = "PASSED" if gate.get("passed") else "REJECTED"
        candidate, champion = gate.get("candidate_version"), gate.get("champion_version")
        out.append(
            f"- {label}: **{verdict}**{f' v{candidate}' if candidate else ''}: "
            f"{gate.get('reason')}" + (f" (champion after: v{champion})" if champion else "")
        )
    failed = [r for r in (after or {}).get("rules", []) if not r.get("passed")]
    if failed:
        out += ["", "Rules that failed:", ""]
        out += [f"- `{r['name']}`: {r.get('detail', '')}" for r in failed]
    return out + [""]


def _plots_section(root: Path, against: str, experiment: str | None) -> list[str]:
    files = _plot_files(root)
    where = (
        f"in experiment `{experiment}` (`dvc exp apply {experiment}` brings them here)"
        if experiment
        else "in the workspace"
    )
    revs = " ".join([against, *([experiment] if experiment else [])])
    out = ["### Plots", "", f"Written by the pipeline {where}:", ""]
    out += [f"- `{path}`" for path in files] or ["- (none declared in dvc.yaml)"]
    return out + ["", f"Side by side: `dvc plots diff {revs}`", ""]


def _plot_files(root: Path) -> list[str]:
    """The files dvc.yaml's top-level `plots` name, in their order."""
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    files: list[str] = []
    for entry in spec.get("plots") or []:
        found = [entry] if isinstance(entry, str) else []
        for key, plot in entry.items() if isinstance(entry, dict) else ():
            # `title: {y: {file: columns}}` names its files under y; else the key is the file.
            ys = plot.get("y") if isinstance(plot, dict) else None
            found += list(ys) if isinstance(ys, dict) else [key]
        files += [f for f in found if f not in files]
    return files


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    return [markdown_table(header, rows), ""]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> str:
    return "—" if value is None else str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return str(value)
