"""What the benchmarks share: the repository's paths, child processes measured one at a time
(wall time, peak RSS, CPU seconds), MNIST arrays from data/raw or synthetic ones, a throwaway
git + DVC copy of the project, and plain-text tables. Imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from mnist_pipeline.data.splits import load_raw

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAW_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# What a throwaway copy of the repository needs for `dvc repro`.
REPO_FILES = ("conf", "pipelines", "src", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")


def steady_epoch_time(times: Sequence[float]) -> float:
    """Median seconds per epoch over the epochs after the first (which traces/compiles)."""
    if not times:
        return float("nan")
    return statistics.median(times[1:] if len(times) > 1 else times)


def ratio(numerator: float, denominator: float) -> float:
    if not denominator or denominator != denominator or numerator != numerator:
        return float("nan")
    return numerator / denominator


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool) -> Iterator[Path]:
    """A new temporary folder, removed afterwards unless `keep` (then its path is printed)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def add_recipes(
    parser: argparse.ArgumentParser, default: Sequence[str], named: Sequence[str]
) -> None:
    """The `--recipes` option: `named` ones (mlp, peer, ...) or conf/experiment/ names."""
    kinds = [*named, "experiment names"]
    either = f"{', '.join(kinds[:-1])} or {kinds[-1]}" if named else kinds[-1]
    parser.add_argument(
        "--recipes", nargs="+", default=list(default), help=f"{either} (default: %(default)s)"
    )


def check_recipes(
    parser: argparse.ArgumentParser, recipes: Sequence[str], named: Sequence[str]
) -> None:
    """Fail the parse unless every recipe is one of `named` or a conf/experiment/ file."""
    experiments = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    unknown = [r for r in recipes if r not in {*named, *experiments}]
    if unknown:
        either = f"{', '.join(named)} or " if named else ""
        parser.error(
            f"--recipes: got {', '.join(unknown)}, expected {either}"
            f"one of conf/experiment/: {', '.join(sorted(experiments))}"
        )


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    align = ("left",) + ("right",) * (len(header) - 1)
    return tabulate(rows, headers=header, tablefmt="plain", colalign=align, disable_numparse=True)


def stage_times(output: str) -> tuple[float, dict[str, float]]:
    """Per-stage seconds from `dvc repro` output lines prefixed by `<seconds> ` timestamps.

    A stage runs from its "Running stage 'x':" line to the next stage's line or the end of
    the output (so it includes DVC hashing its outputs and updating dvc.lock). Returns the
    seconds before the first stage starts and `{stage: seconds}`.
    """
    marks: list[tuple[float, str]] = []
    last = 0.0
    for line in output.splitlines():
        match = re.match(r"^\s*(\d+\.\d+) (.*)$", line)
        if not match:
            continue
        stamp, text = float(match.group(1)), match.group(2)
        last = stamp
        started = re.match(r"Running stage '([^']+)'", text)
        if started:
            marks.append((stamp, started.group(1)))
    times = {
        name: (marks[i + 1][0] if i + 1 < len(marks) else last) - stamp
        for i, (stamp, name) in enumerate(marks)
    }
    return (marks[0][0] if marks else last), times


@dataclass
class Finished:
    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    output: str

    def check(self, what: str, program: str = "benchmark") -> Finished:
        if self.returncode != 0:
            raise SystemExit(
                f"{program}: {what} failed (exit {self.returncode}):\n{self.output[-4000:]}"
            )
        return self


def child_env(**extra: str) -> dict[str, str]:
    """The venv first on PATH, no outside tracking store or DVC experiment settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_measured(
    command: list[str], *, cwd: Path, env: dict[str, str], timeout: float, stamp_lines: bool = False
) -> Finished:
    """Run `command` to completion; its wall time, own peak RSS and CPU seconds.

    `os.wait4` returns the rusage of this one child (and the grandchildren it waited for),
    unlike `RUSAGE_CHILDREN`, whose peak RSS is the largest of every child ever waited for.
    With `stamp_lines`, each output line is prefixed with the seconds since the start.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(f"{time.perf_counter() - start:8.2f} {line}" if stamp_lines else line)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Finished(
        command=command,
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output="".join(lines),
    )


def synthetic_arrays(n_train: int = 60000, n_test: int = 10000) -> dict[str, Any]:
    """Learnable digits in MNIST's shapes: a bright bar at a class-specific row."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        rows = 3 + 2 * labels.astype(np.int64)
        for offset in (0, 1):
            images[np.arange(n), rows + offset, 4:24] = 255
        out[f"x_{name}"], out[f"y_{name}"] = images, labels
    return out


def raw_arrays(raw: Path) -> dict[str, Any]:
    """The four MNIST files in `raw` as Keras' `mnist.load_data` names them."""
    train = load_raw(raw, RAW_FILES["x_train"], RAW_FILES["y_train"])
    test = load_raw(raw, RAW_FILES["x_test"], RAW_FILES["y_test"])
    return {
        "x_train": train.images,
        "y_train": train.labels,
        "x_test": test.images,
        "y_test": test.labels,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_repo(path: Path, raw: Path | None) -> None:
    """A git + DVC copy of the project; with `raw`, the fetch stage is already done."""
    path.mkdir(parents=True)
    for name in REPO_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, path / name)
    env = child_env(
        GIT_AUTHOR_NAME="bench",
        GIT_COMMITTER_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_EMAIL="bench@localhost",
    )
    commands = [
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "config", "hydra.enabled", "True"],
    ]
    if raw is not None:
        shutil.copytree(raw, path / "data" / "raw")
        # "Already fetched" means recorded in dvc.lock, as after an earlier `dvc repro
        # fetch`: an unrecorded copy would be fetched again.
        commands.append(["dvc", "commit", "--force", "fetch"])
    commands += [["git", "add", "-A"], ["git", "commit", "-qm", "benchmark copy"]]
    for command in commands:
        done = subprocess.run(command, cwd=path, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"benchmark: {' '.join(command)} failed: {done.stderr[-2000:]}")
