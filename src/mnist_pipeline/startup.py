"""What a process that loads TensorFlow sets before it does: called first by the train and
evaluate stages, sweep workers and `mnist-predict`, never on import, so a notebook importing
this library keeps its usual behaviour.

Quiet start-up: TensorFlow's C++ side prints notices nobody can act on (oneDNN is on, no CUDA
driver, a failed `cuInit` on a machine without a GPU, ...). Those logged once its logging is
set up obey `TF_CPP_MIN_LOG_LEVEL`. Those logged while its shared libraries load come first:
absl prints "WARNING: All log messages before absl::InitializeLog() ..." and then every
message, and reads no environment variable (`TF_CPP_MIN_LOG_LEVEL`, `ABSL_MIN_LOG_LEVEL`,
`GLOG_minloglevel`, `TF_ENABLE_ONEDNN_OPTS=1` all leave them), so they are taken out of
stderr while `tensorflow` is imported and every other line is passed on. Nothing here changes
what TensorFlow computes (oneDNN stays on) or which devices it sees. `MNIST_PIPELINE_DEBUG=1`
leaves all of it as it was.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.abc
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import cast

from .errors import DEBUG_ENV

# Keras imports these at start-up whenever they are installed, only to offer wrappers no
# stage uses (scikit-learn is installed as an MLflow dependency): ~60 MB of every training
# process's peak memory. A process that needs one imports it before calling `prepare`.
UNUSED_BY_STAGES = ("sklearn",)

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


def debug() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def prepare() -> None:
    """Quiet TensorFlow's start-up, keep unused modules out of memory, exit promptly."""
    quiet()
    for name in UNUSED_BY_STAGES:
        # `import sklearn` now raises ImportError (a None entry blocks an import)
        cast("dict[str, ModuleType | None]", sys.modules).setdefault(name, None)
    exit_promptly()


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
    """Quiet TensorFlow's C++ start-up lines in this process, unless debugging."""
    if debug():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "tensorflow" not in sys.modules and not any(
        isinstance(finder, _QuietImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietImport())


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
    """File descriptor 2 (C++ writes included) goes through `stderr_filter` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    process = stderr_filter()
    # `quiet` installs the importer that calls this only when not debugging: a filter runs.
    assert process is not None and process.stdin is not None, "no stderr filter to write to"
    os.dup2(process.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        end_filter(process)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Imports `tensorflow` (whoever asks first: Keras, MLflow, the library) with its
    start-up lines taken out of stderr; steps aside after that one import."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # as the other finders would have found it
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            with without_startup_lines():
                self.loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self.loader  # as if never wrapped

    def __getattr__(self, name: str):  # anything else the import system asks the real loader
        return getattr(self.loader, name)
