"""What a process that loads TensorFlow does at start-up, in two explicit calls: `prepare`
first, then `load_tensorflow` before it imports any module that imports TensorFlow or Keras
(the library's training and evaluation modules do so at module level). The train and evaluate
stages, sweep workers, the gate service and the benchmarks' training children call both;
nothing here runs on import, so a notebook importing this library keeps its usual behaviour.

Quiet start-up: TensorFlow's C++ side prints notices nobody can act on (oneDNN is on, no CUDA
driver, a failed `cuInit` on a machine without a GPU, ...). Those logged once its logging is
set up obey `TF_CPP_MIN_LOG_LEVEL` (`prepare` sets it). Those logged while its shared
libraries load come first: absl prints "WARNING: All log messages before
absl::InitializeLog() ..." and then every message, and reads no environment variable
(`TF_CPP_MIN_LOG_LEVEL`, `ABSL_MIN_LOG_LEVEL`, `GLOG_minloglevel`, `TF_ENABLE_ONEDNN_OPTS=1`
all leave them), so `load_tensorflow` imports TensorFlow and Keras inside
`without_startup_lines`, which takes those lines out of stderr and passes every other line on.
A module that imports TensorFlow before `load_tensorflow` runs prints them: call it first.
Nothing here changes what TensorFlow computes (oneDNN stays on) or which devices it sees.

Also in `load_tensorflow`: Keras loads without its scikit-learn wrappers (61 MB; scikit-learn
itself stays importable), and the objects importing TensorFlow and Keras created are frozen
out of the garbage collector. Only a process's start-up freezes, here; library code never
does.

`MNIST_PIPELINE_DEBUG=1` shows the start-up lines and keeps the collection at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import cast

from .errors import DEBUG_ENV

# Errors too (3): on a machine without a GPU, a CUDA build logs a failed `cuInit` as one.
# TensorFlow's real errors reach Python as exceptions, which say the same. And no download
# bar when a stage loads a logged model (the gate's smoke test, the champion's re-scoring):
# in a log it is a screenful of carriage returns.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

# TensorFlow's C++ start-up notices, as absl prints them (`I0000 00:00:1795.. 123 file.cc:45]`).
_ABSL = r"[IWE]\d{4} [\d:. ]+\s+\d+ \S+:\d+\] "
STARTUP_LINE = re.compile(
    "|".join(
        [
            r"WARNING: All log messages before absl::InitializeLog\(\) is called are written "
            r"to STDERR",
            r"I\d{4} [\d:. ]+\s+\d+ \S+:\d+\] ",  # any INFO line while TensorFlow loads
            _ABSL + r"oneDNN custom operations are on",
            _ABSL + r"Could not find cuda drivers on your machine",
            _ABSL + r"failed call to cuInit",
            _ABSL + r"Unable to register (cuDNN|cuFFT|cuBLAS) factory",
            _ABSL + r"computation placer already registered",
            _ABSL + r"This TensorFlow binary is optimized to use available CPU instructions",
            r"To enable the following instructions: .* rebuild TensorFlow with the appropriate "
            r"compiler",
        ]
    )
)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def debug() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def prepare() -> None:
    """Quiet TensorFlow's logging and exit promptly: first thing in a process's start-up."""
    quiet()
    exit_promptly()


def load_tensorflow() -> None:
    """Import TensorFlow and Keras with their C++ start-up lines taken out of stderr, without
    Keras' scikit-learn wrappers, then freeze what the imports created out of the garbage
    collector. Call it after `prepare`, before importing a module that imports TensorFlow or
    Keras. Nothing to do once Keras is loaded.

    Frozen, the ~360k objects importing TensorFlow and Keras creates, which live as long as
    the process, are skipped by every collection (each full one walked them all, ~0.3 s:
    during the run and twice at exit); a training process ends 2-4 s sooner. Objects made
    from here on are collected as usual.
    """
    if "keras" in sys.modules:
        return
    quiet()
    # Keras imports scikit-learn at start-up whenever it is installed (MLflow installs it),
    # only for its wrappers, which no stage uses: 61 MB of the peak memory of every process
    # that loads Keras (655 MB instead of 716 MB for `import keras` alone).
    with without_startup_lines(), _without("sklearn"):
        import tensorflow  # noqa: F401
        import keras  # noqa: F401
    gc.freeze()


@contextlib.contextmanager
def _without(name: str) -> Iterator[None]:
    """`import name` raises ImportError meanwhile (a None entry in `sys.modules` blocks an
    import), unless the process imported it already. Afterwards it imports as usual; what
    was imported meanwhile made do without it (Keras' scikit-learn wrappers, in this process,
    then raise ImportError: a process that uses them imports scikit-learn first)."""
    modules = cast("dict[str, ModuleType | None]", sys.modules)
    blocked = name not in modules
    if blocked:
        modules[name] = None
    try:
        yield
    finally:
        if blocked and name in modules and modules[name] is None:
            del modules[name]


def exit_promptly() -> None:
    """Skip the garbage collection Python runs over every object as it exits.

    With TensorFlow or MLflow loaded, that collection takes 0.7-1.2 s of each stage's wall
    time, after its work is done and its outputs are written (atomically, and closed), and
    frees nothing the operating system would not. The rest of the exit still runs: atexit
    handlers (MLflow's, logging's, `weakref.finalize` and so `TemporaryDirectory` clean-up),
    thread joins, standard streams flushed. What reference cycles keep alive is left to the
    operating system unfinalised, module globals they reach included: a process that calls
    this closes the files it writes (the stages write atomically, then close). Called before
    anything else registers an atexit handler, `gc.freeze` runs last.
    `MNIST_PIPELINE_DEBUG=1` keeps the collection.
    """
    if not debug():
        atexit.register(gc.freeze)  # a second registration freezes again: harmless


def quiet() -> None:
    """Quiet TensorFlow's logging (and MLflow's download bar) in this process and the ones it
    starts, unless debugging."""
    if debug():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def quiet_env() -> dict[str, str]:
    """What a subprocess that loads TensorFlow (MLflow's model server) gets on top of ours."""
    return {} if debug() else {k: os.environ.get(k, v) for k, v in QUIET_ENV.items()}


# A separate process does the filtering, so that if TensorFlow's loading aborts the
# process, whatever it printed first still gets through. `-I -S`: no site, ~10 ms.
_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the process it filters for
startup_line = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if not startup_line.match(line.decode(errors="replace")):
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
"""


def stderr_filter() -> subprocess.Popen | None:
    """A process that copies what it is sent to this process's stderr without TensorFlow's
    start-up lines (None when debugging: keep everything). Close its stdin, then wait."""
    if debug():
        return None
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _FILTER, STARTUP_LINE.pattern],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )


def end_filter(process: subprocess.Popen | None, timeout_s: float = 10) -> None:
    """Let `process` copy what is left and exit."""
    if process is None:
        return
    assert process.stdin is not None, "stderr_filter's process reads a pipe"
    process.stdin.close()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # a grandchild still holds the pipe: leave it be
        pass


@contextlib.contextmanager
def without_startup_lines() -> Iterator[None]:
    """File descriptor 2 (C++ writes included) goes through `stderr_filter` meanwhile;
    unchanged when debugging."""
    process = stderr_filter()
    if process is None:
        yield
        return
    assert process.stdin is not None, "stderr_filter's process reads a pipe"
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(process.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        end_filter(process)
