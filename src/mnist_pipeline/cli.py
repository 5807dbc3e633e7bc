"""`mnist-pipeline`: the champion's history, a guarded rollback, the review report, and the
production monitor.

    mnist-pipeline champion history [--model NAME] [--json] [--limit N]
    mnist-pipeline champion rollback --to vN --reason "..." [--force] [--model NAME]
    mnist-pipeline review [--against main] [--exp NAME] [-o report.md]
    mnist-pipeline monitor [--window N] [--windows K] [--log URL] [--report FILE]
    mnist-pipeline team up|down|status|env|user ...   (python -m mnist_pipeline.team)

Run from the project's root (or set DVC_ROOT): the tracking store and the registered model
come from params.yaml's `tracking` section, as for the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import project, startup
from .config.loading import checkout_section
from .errors import DataError, PromotionError, ReviewError, TrackingError, describe_error, reported

PROG = "mnist-pipeline"
COLUMNS = (
    "#",
    "time (UTC)",
    "outcome",
    "version",
    "champion",
    "p-value",
    "level",
    "by",
    "commit",
    "experiment",
    "reason",
)
REASON_CHARS = 70


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] == ["team"]:  # the stack parses its own words, `--help` included
        from .team import stack

        return stack.main(words[1:])
    args = _parser().parse_args(argv)
    with reported(PROG):
        return args.run(args)
    return 1  # not reached: `reported` exits on a PipelineError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    champion = commands.add_parser("champion", help="the champion's history; rollback")
    actions = champion.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = actions.add_parser("history", help="every decision on the champion, newest first")
    show.add_argument("--model", help="registered model (default: tracking.registered_model)")
    show.add_argument("--json", action="store_true", help="print the entries as JSON")
    show.add_argument("--limit", type=_positive, help="only the newest N entries")
    show.set_defaults(run=_history)

    back = actions.add_parser("rollback", help="move the champion to an earlier version")
    back.add_argument("--to", required=True, metavar="vN", help="the version, e.g. v3")
    back.add_argument("--reason", required=True, help="why; recorded in the history")
    back.add_argument(
        "--force",
        action="store_true",
        help="skip the checks (passed the gate before, same test set); recorded as forced",
    )
    back.add_argument("--model", help="registered model (default: tracking.registered_model)")
    back.set_defaults(run=_rollback)

    review = commands.add_parser(
        "review", help="Markdown comparing this workspace (or an experiment) with a git revision"
    )
    review.add_argument(
        "--against",
        default="main",
        metavar="REV",
        help="git revision to compare with (default: main)",
    )
    review.add_argument("--exp", metavar="NAME", help="a DVC experiment instead of the workspace")
    review.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    review.set_defaults(run=_review)

    monitor = commands.add_parser(
        "monitor",
        help="the newest requests the server answered against the champion's "
        "reference: drift tests and estimated accuracy; exits 3 on an alarm",
    )
    monitor.add_argument(
        "--window", type=_positive, help="answers per window (default: monitoring.window)"
    )
    monitor.add_argument(
        "--windows",
        type=_positive,
        help="how many of the newest windows (default: monitoring.windows)",
    )
    monitor.add_argument(
        "--alpha",
        type=_fraction,
        help="false-alarm level of one window's tests (default: monitoring.alpha)",
    )
    monitor.add_argument(
        "--estimator", choices=("atc", "cbpe"), help="default: monitoring.estimator"
    )
    monitor.add_argument(
        "--log",
        metavar="URL",
        help="the request log (default: "
        "MNIST_MONITORING_LOG, else monitoring.log, else "
        "monitoring/requests.db)",
    )
    monitor.add_argument(
        "--version", help="the served version to check (default: the one that answered last)"
    )
    monitor.add_argument(
        "--report", metavar="FILE", help="the HTML report (default: monitoring.report)"
    )
    monitor.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not log the windows as runs of the monitoring experiment",
    )
    monitor.set_defaults(run=_monitor)

    # Listed for `mnist-pipeline --help`; `main` hands its words to the stack's own parser.
    commands.add_parser(
        "team",
        help="the team stack: up [--network], down, status, "
        "env, user add NAME --role R, user remove NAME",
        add_help=False,
    )
    return parser


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a number in (0, 1)")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a whole number >= 1")
    return int(text)


# --- champion ------------------------------------------------------------------------------


def _connect(model: str | None) -> tuple[str, Any]:
    """The registered model's name and the tracking config, with MLflow pointed at it."""
    from .tracking import store

    cfg = checkout_section("tracking")
    uri = store.tracking_uri(cfg)
    if store.not_created(uri):
        raise TrackingError(f"no tracking store at {uri}: run the pipeline first (dvc repro)")
    store.use_store(cfg)
    store.silence()
    return model or cfg.registered_model, cfg


def _history(args: argparse.Namespace) -> int:
    from .tracking import history

    name, _ = _connect(args.model)
    recorded = history.entries(name)  # oldest first
    entries = recorded[::-1]
    if args.limit:
        entries = entries[: args.limit]
    if args.json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"{name}: no decisions recorded yet (the evaluate stage records each one)")
    else:
        print(table(entries))
        print()
        print(budgets(recorded, checkout_section("gate").alpha))
    return 0


def budgets(entries: list[dict[str, Any]], alpha: float) -> str:
    """What is left of each test set's false-promotion budget (oldest entries first)."""
    from .evaluation import reuse

    test_sets = list(
        dict.fromkeys(reuse.test_set(entry) for entry in entries if entry.get("action") == "gate")
    )
    lines = [
        f"test set {sha[:12]}…: {reuse.budget(reuse.decisions_on(entries, sha), alpha).describe()}"
        for sha in test_sets
        if sha
    ]
    return "\n".join(lines) or "no gate decisions yet: the whole budget is unspent"


def table(entries: list[dict[str, Any]]) -> str:
    """The history as an aligned plain-text table, one row per entry, in the given order."""
    from tabulate import tabulate

    rows = [_row(entry) for entry in entries]
    return tabulate(rows, headers=COLUMNS, tablefmt="plain", disable_numparse=True)


def _row(entry: dict[str, Any]) -> tuple[str, ...]:
    from .evaluation.scores import p_text
    from .tracking.registry import label

    before, after = entry.get("champion_before"), entry.get("champion_after")
    champion = label(after) if before == after else f"{label(before)} -> {label(after)}"
    p_value, level = entry.get("p_value"), entry.get("level")
    commit = (entry.get("git_commit") or "")[:8] + ("+dirty" if entry.get("git_dirty") else "")
    reason = " ".join(str(entry.get("reason", "")).split())
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    return (
        str(entry.get("seq", "")),
        str(entry.get("time", "")).replace("T", " ").rstrip("Z"),
        str(entry.get("outcome", "")),
        label(entry.get("candidate")),
        champion,
        "" if p_value is None else p_text(p_value, ".3g"),
        "" if level is None or p_value is None else f"{level:.3g}",
        f"{entry.get('user', '?')}@{entry.get('host', '?')}",
        commit or "-",
        entry.get("dvc_experiment") or "-",
        reason,
    )


def _rollback(args: argparse.Namespace) -> int:
    from .data.splits import load_split
    from .evaluation import rollback
    from .tracking import locks

    name, cfg = _connect(args.model)
    processed = project.root() / checkout_section("paths").processed
    try:
        today = load_split(processed, "test").sha256()
    except DataError as err:
        if not args.force:
            raise PromotionError(
                f"cannot check the test set ({err}); run: dvc repro preprocess"
            ) from None
        today = None
    move = rollback.move(
        name,
        args.to,
        args.reason,
        test_sha256=today,
        force=args.force,
        lock_url=locks.lock_url(cfg.lock_url),
    )
    print(move.line(name))
    print(
        f"{PROG}: the next `dvc repro` re-evaluates this workspace's model against v{move.version}"
    )
    return 0


# --- review --------------------------------------------------------------------------------


def _review(args: argparse.Namespace) -> int:
    from .evaluation import review
    from .files import write_text

    text = review.report(project.root(), against=args.against, experiment=args.exp)
    if args.output:
        try:
            write_text(Path(args.output), text)
        except OSError as err:
            raise ReviewError(f"-o {args.output}: {describe_error(err)}") from None
        print(f"{PROG}: wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


# --- monitor -------------------------------------------------------------------------------


def _monitor(args: argparse.Namespace) -> int:
    import tempfile

    from .monitoring import monitor, report, requestlog
    from .monitoring.drift import Reference
    from .tracking import monitor_runs, store

    cfg = checkout_section("monitoring")
    size, count = args.window or cfg.window, args.windows or cfg.windows
    alpha, method = args.alpha or cfg.alpha, args.estimator or cfg.estimator
    url = requestlog.log_url(args.log or cfg.log)
    log = requestlog.RequestLog(url)
    try:
        windows = monitor.newest_windows(log, size, count, version=args.version)
        total = log.count()
    finally:
        log.close()
    if not windows:
        print(
            f"{PROG} monitor: fewer than {size} answers of this version in "
            f"{requestlog.display(url)} ({total} rows in all): nothing to check yet"
        )
        return 0
    model, version = windows[-1].model, windows[-1].version
    name, tracking = _connect(model)
    os.environ.update(startup.quiet_env())  # no download bar: one line per window
    with tempfile.TemporaryDirectory() as tmp:
        reference = Reference.load(monitor_runs.download_reference(name, version, tmp))
    checked = [
        monitor.check_window(
            w, reference, alpha=alpha, method=method, min_distance=cfg.min_distance
        )
        for w in windows
    ]
    for result in checked:
        print(f"{PROG} monitor: {result.line()}")
        if result.caveat:
            print(f"    note: {result.caveat}")
    if not args.no_mlflow:
        experiment_id = store.connect(
            tracking.model_copy(update={"experiment_name": cfg.experiment})
        )
        done = monitor_runs.logged_windows(experiment_id, [c.key for c in checked])
        for result in checked:
            if result.key in done:
                continue
            monitor_runs.log_window(
                experiment_id,
                result.key,
                name=f"v{version} {result.window.first_id}-{result.window.last_id}",
                tags={
                    "model": model,
                    "version": version,
                    "alarm": str(result.drift.alarm).lower(),
                    "fired": ",".join(result.drift.fired) or "-",
                },
                metrics=result.metrics(),
                timestamp_ms=int(float(result.window.times[-1]) * 1000),
                report=result.as_dict(),
            )
        print(
            f"{PROG} monitor: {len(checked) - len(done)} new window run(s) in experiment "
            f"{cfg.experiment!r} of {store.current_uri()}"
        )
    target = Path(args.report) if args.report else project.root() / cfg.report
    try:
        report.write(target, checked, reference, log=requestlog.display(url), alpha=alpha)
    except OSError as err:
        raise DataError(f"--report {target}: {describe_error(err)}") from None
    print(f"{PROG} monitor: wrote {target}")
    alarms = sum(c.drift.alarm for c in checked)
    if alarms:
        print(
            f"{PROG} monitor: ALARM in {alarms} of {len(checked)} window(s): the traffic no "
            "longer looks like the test set the champion was certified on (docs/"
            "monitoring.md says what to do)",
            file=sys.stderr,
        )
        return monitor.ALARM_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
