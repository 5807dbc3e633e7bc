"""A cold `dvc exp run -S experiment=quick` (train, champion, evaluate and the gate; the data
already prepared) on a copy of the project, timed stage by stage, next to what every stage
process pays before it does any work.

    python benchmarks/quick_experiment.py               # 3 runs of each scenario (~4 min)
    python benchmarks/quick_experiment.py --runs 1

Two scenarios, each in its own git + DVC copy of the project made from this checkout:

- `first`: the first experiment ever: no tracking store yet (removed before each run), so
  the train stage creates it and the gate has no champion to beat;
- `next`: after `dvc repro` (the tutorial MLP trained, evaluated and champion): the store
  exists and every run is gated against the champion the run before it left.

Every run sets a new `train.seed`, so DVC's run cache holds none of it: each trains and
evaluates from scratch. Also measured, in the same run: the start-up of one process that
imports TensorFlow, Keras and MLflow and opens the store, which the train and evaluate stages
each pay before any work, and `python -c pass`. Numbers are printed, never
asserted; the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness import (
    RAW_FILES,
    ROOT,
    child_env,
    cpu_model,
    make_repo,
    run_measured,
    stage_times,
    table,
)

PROGRAM = "quick_experiment"
STAGES = ("train", "champion", "evaluate")
# One stage process's start-up: what train and evaluate import and open before their work.
STARTUP_PROBE = """
import sys
from mnist_pipeline import startup
startup.prepare()
startup.load_tensorflow()
import mlflow
mlflow.MlflowClient(sys.argv[1]).search_experiments()
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--experiment", default="quick", help="conf/experiment/<name>.yaml")
    parser.add_argument(
        "--raw",
        type=Path,
        default=ROOT / "data" / "raw",
        help="the fetched MNIST files (default: data/raw)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: got {args.runs}, expected at least 1")
    if not (args.raw / RAW_FILES["y_test"]).is_file():
        parser.error(f"--raw {args.raw}: no MNIST files there (run `dvc repro fetch` first)")
    return args


def run(command: list[str], repo: Path, timeout: float, what: str) -> None:
    run_measured(command, cwd=repo, env=child_env(), timeout=timeout).check(what, PROGRAM)


def experiment(repo: Path, name: str, seed: int, timeout: float) -> dict:
    """One cold `dvc exp run`: wall and CPU seconds, seconds per stage, and the result."""
    done = run_measured(
        ["dvc", "exp", "run", "-S", f"experiment={name}", "-S", f"train.seed={seed}"],
        cwd=repo,
        env=child_env(),
        timeout=timeout,
        stamp_lines=True,
    ).check(f"dvc exp run ({name}, seed {seed})", PROGRAM)
    before, stages = stage_times(done.output)
    ran = sum(stages.values())
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    gate = json.loads((repo / "gate.json").read_text())
    return {
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "dvc_before_s": before,
        "stages": stages,
        "dvc_after_s": done.wall_s - before - ran,
        "test_accuracy": metrics["test_accuracy"],
        "gate": "passed" if gate.get("passed") else "rejected",
    }


def startup_probe(repo: Path, timeout: float) -> tuple[float, float]:
    """Seconds for `python -c pass` and for one stage process's start-up (median of 3)."""
    store = f"sqlite:///{repo / 'mlflow.db'}"
    empty = [
        run_measured(
            [sys.executable, "-c", "pass"], cwd=repo, env=child_env(), timeout=timeout
        ).wall_s
        for _ in range(3)
    ]
    probe = [
        run_measured(
            [sys.executable, "-c", STARTUP_PROBE, store], cwd=repo, env=child_env(), timeout=timeout
        )
        .check("start-up probe", PROGRAM)
        .wall_s
        for _ in range(3)
    ]
    return statistics.median(empty), statistics.median(probe)


def scenario(work: Path, label: str, args: argparse.Namespace, seeds: range) -> list[dict]:
    repo = work / label
    make_repo(repo, args.raw)
    print(f"{label}: preparing the copy ...", flush=True)
    run(["dvc", "repro", "preprocess"], repo, args.timeout, "dvc repro preprocess")
    if label == "next":
        run(["dvc", "repro"], repo, args.timeout, "dvc repro")
    results = []
    for seed in seeds:
        if label == "first":
            for name in ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm", "mlartifacts"):
                path = repo / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        result = experiment(repo, args.experiment, seed, args.timeout)
        results.append(result)
        print(
            f"{label} #{len(results)}: {result['wall_s']:.1f} s, test accuracy "
            f"{result['test_accuracy']:.4f}, gate {result['gate']}",
            flush=True,
        )
    return results


def report(results: dict[str, list[dict]], empty_s: float, startup_s: float) -> list[str]:
    rows = []
    for label, runs in results.items():
        for number, r in enumerate(runs, 1):
            rows.append(
                [
                    f"{label} #{number}",
                    f"{r['wall_s']:.1f}",
                    f"{r['cpu_s']:.1f}",
                    f"{r['dvc_before_s']:.1f}",
                    *(f"{r['stages'].get(s, 0):.1f}" for s in STAGES),
                    f"{r['dvc_after_s']:.1f}",
                    f"{r['test_accuracy']:.4f}",
                    r["gate"],
                ]
            )
    lines = [
        table(
            rows, ["run", "wall s", "CPU s", "DVC before", *STAGES, "DVC after", "test acc", "gate"]
        ),
        "",
    ]
    for label, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        accuracies = [r["test_accuracy"] for r in runs]
        lines.append(
            f"{label}: wall median {statistics.median(walls):.1f} s (min "
            f"{min(walls):.1f}, max {max(walls):.1f}); test accuracy "
            f"{min(accuracies):.4f}-{max(accuracies):.4f}"
        )
    lines.append(
        f"one stage process's start-up (TensorFlow + Keras + MLflow, store opened): "
        f"{startup_s:.2f} s median; `python -c pass`: {empty_s:.2f} s"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="quick-experiment-") as tmp:
        work = Path(tmp)
        results = {"first": scenario(work, "first", args, range(1, args.runs + 1))}
        results["next"] = scenario(work, "next", args, range(101, 101 + args.runs))
        empty_s, startup_s = startup_probe(work / "next", args.timeout)
    print()
    print("\n".join(report(results, empty_s, startup_s)))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
