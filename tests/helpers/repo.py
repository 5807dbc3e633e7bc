"""A throwaway copy of the project as a git + DVC repository, on small synthetic data.

The copy has the real `dvc.yaml`, `conf/` and stage scripts; only the fetch mirror (a
local `file://` folder of synthetic IDX files), the split size, the epochs and the gate
thresholds are changed, so whole pipelines run in seconds without the internet.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from helpers import empty_store
from helpers.digits import ROOT, synthetic_digits
from mnist_pipeline.config.compose import write as write_params
from mnist_pipeline.data import idx

VENV_BIN = Path(sys.executable).parent
COPIED = ("conf", "pipelines", "src", "dvc.yaml", ".dvcignore", ".gitignore")
RAW_NAMES = {
    "train-images-idx3-ubyte": ("train", "images"),
    "train-labels-idx1-ubyte": ("train", "labels"),
    "t10k-images-idx3-ubyte": ("test", "images"),
    "t10k-labels-idx1-ubyte": ("test", "labels"),
}


def env(**extra: str) -> dict[str, str]:
    """The environment stages run with: the venv first on PATH, no outside tracking URI."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    out["PATH"] = f"{VENV_BIN}{os.pathsep}{out.get('PATH', '')}"
    out["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out["DVC_NO_ANALYTICS"] = "1"  # no report to DVC's servers from `dvc init` (tests stay offline)
    out["PYTHONUNBUFFERED"] = "1"
    out["GIT_AUTHOR_NAME"] = out["GIT_COMMITTER_NAME"] = "test"
    out["GIT_AUTHOR_EMAIL"] = out["GIT_COMMITTER_EMAIL"] = "test@localhost"
    out.update(extra)
    return out


def set_params(path: Path, section: str, **values) -> None:
    """Change keys of one section of the repository's params.yaml (as an editor would)."""
    params = yaml.safe_load((path / "params.yaml").read_text())
    params[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def exp_metric(path: Path, name: str) -> float:
    """The test accuracy `dvc exp show` reports for experiment `name`."""
    done = run(["dvc", "exp", "show", "--json"], path)
    for baseline in json.loads(done.stdout):
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                revs = exp["revs"][0]["data"]["metrics"]
                return revs["metrics/evaluate.json"]["data"]["test_accuracy"]
    raise AssertionError(f"experiment {name} not found: {done.stdout[:2000]}")


def write_mirror(folder: Path, n_train: int = 600, n_test: int = 200) -> dict[str, str]:
    """Synthetic IDX files in `folder`; returns their SHA-256 by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": synthetic_digits(n_train, seed=1), "test": synthetic_digits(n_test, seed=2)}
    digests = {}
    for name, (split, kind) in RAW_NAMES.items():
        images, labels = arrays[split]
        idx.write(folder / name, images if kind == "images" else labels)
        digests[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return digests


def make(
    path: Path,
    *,
    epochs: int = 2,
    val_size: int = 100,
    gate: dict | None = None,
    train: dict | None = None,
    commit: bool = True,
    n_train: int = 600,
    store: bool = False,
) -> Path:
    """A git + DVC repository at `path` whose pipeline runs on synthetic data; with `store`,
    also an empty tracking store at its root (`empty_store`: MLflow need not build one)."""
    path.mkdir(parents=True, exist_ok=True)
    if store:
        empty_store.place(path / "mlflow.db")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(source, path / name)
    digests = write_mirror(path.parent / f"{path.name}-mirror", n_train=n_train)
    fetch = yaml.safe_load((path / "conf/fetch/default.yaml").read_text())
    fetch["mirrors"] = [
        {
            "name": "local",
            "kind": "http",
            "url": (path.parent / f"{path.name}-mirror").as_uri() + "/",
            "suffix": "",
        }
    ]
    fetch["files"] = digests
    _dump(path / "conf/fetch/default.yaml", fetch)
    _update(path / "conf/preprocess/default.yaml", {"val_size": val_size})
    # Small batches and a brisker learning rate: the synthetic digits are learnt in 2 epochs.
    _update(
        path / "conf/train/default.yaml",
        {"epochs": epochs, "verbose": 0, "batch_size": 32, **(train or {})},
    )
    _update(path / "conf/optimizer/sgd.yaml", {"learning_rate": 0.05})
    # The robustness and calibration rules run, but with bounds two-epoch models on synthetic
    # digits always meet; each significance test is at alpha (their own tests check those).
    _update(
        path / "conf/gate/default.yaml",
        {
            "min_accuracy": 0.5,
            "min_class_recall": 0.0,
            "robustness_margin": 1.0,
            "max_ece": 1.0,
            "reuse": False,
            **(gate or {}),
        },
    )
    write_params(path / "conf", path / "params.yaml")
    run(["git", "init", "-q", "-b", "main"], path)
    shutil.copytree(_dvc_folder(), path / ".dvc")
    if commit:
        run(["git", "add", "-A"], path)
        run(["git", "commit", "-qm", "pipeline"], path)
    else:  # staged, as `dvc init` leaves them
        run(["git", "add", ".dvc", ".dvcignore"], path)
    return path


@functools.cache
def _dvc_folder() -> Path:
    """`.dvc/` as `dvc init` and `dvc config` leave it in a new git repository, made once per
    test process (three DVC start-ups, about 1.5 s, saved on every other repository)."""
    scratch = Path(tempfile.mkdtemp(prefix="dvc-init-"))
    atexit.register(shutil.rmtree, scratch, True)
    run(["git", "init", "-q", "-b", "main"], scratch)
    run(["dvc", "init", "-q"], scratch)
    run(["dvc", "config", "hydra.enabled", "True"], scratch)
    run(["dvc", "config", "core.analytics", "false"], scratch)
    shutil.rmtree(scratch / ".dvc/tmp")  # this repository's own state, made on first use
    return scratch / ".dvc"


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600, **extra_env: str
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def start(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.Popen:
    """Start `cmd` in its own session with SIGINT at its default, as a terminal would, even
    when the tests run in the background of a non-interactive shell: such a shell starts
    them with SIGINT ignored, and every child would inherit that."""
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env(**extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def python(script: str, *args: str) -> list[str]:
    return [str(VENV_BIN / "python"), script, *args]


def store(path: Path) -> str:
    return f"sqlite:///{path / 'mlflow.db'}"


def last_epoch(db: Path) -> int:
    """The highest epoch any run in the SQLite store `db` has logged metrics for (0: none)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            row = conn.execute("select max(step) from metrics where key='loss'").fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    return int(row[0] or 0)  # an aggregate: always one row, NULL when empty


def wait_for_epoch(db: Path, epoch: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Block until some run in the SQLite store has logged metrics for `epoch`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            )
        if last_epoch(db) >= epoch:
            return
        time.sleep(0.2)
    raise AssertionError(f"no epoch {epoch} logged within {timeout} s")


def stop(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 120
) -> tuple[int, str]:
    os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _dump(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _update(path: Path, values: dict) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    data.update(values)
    _dump(path, data)


def run_queue(path: Path, jobs: int, timeout: float = 900, **extra_env: str) -> str:
    """`dvc queue start -j <jobs>`, wait until nothing is queued or running, and return
    `dvc queue status`; then end any worker left idle.

    `dvc queue start` leaves a daemon holding its stdout, so its output goes to a file, not a
    pipe: with two workers, DVC's celery sometimes leaves one waiting for a shutdown message
    sent to the other, and a pipe would keep the caller waiting with it.
    """
    with open(path / ".dvc" / "tmp" / "queue-start.log", "ab") as log:
        done = subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=path,
            env=env(**extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert done.returncode == 0, (path / ".dvc" / "tmp" / "queue-start.log").read_text()
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], path, **extra_env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"the queue did not finish:\n{status}")
    for pid_file in (path / ".dvc" / "tmp" / "exps" / "celery").glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    return status
