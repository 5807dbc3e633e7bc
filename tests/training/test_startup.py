"""Stage processes load TensorFlow through `startup.load_tensorflow`: quietly (no C++
start-up lines unless debugging), without Keras' scikit-learn wrappers, and with what the
import created frozen out of the garbage collector."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tf_output

from mnist_pipeline.errors import DEBUG_ENV

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import gc, sys
{start}
import keras
from mnist_pipeline.training import models
models.build_optimizer  # the library works as usual
print(type(sys.modules["sklearn"]).__name__ if "sklearn" in sys.modules else "absent")
print(gc.get_freeze_count() > 100_000)
import numpy as np
import sklearn.base  # importable afterwards, whatever the start-up did
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
print(tuple(model.predict(np.ones((4, 3)), verbose=0).shape))
try:
    keras.wrappers.SKLearnClassifier(model=model)
    print("wrappers")
except ImportError:  # Keras loaded without scikit-learn: its wrappers say it is missing
    print("no wrappers")
"""

LOAD = "import tensorflow as tf; print(float(tf.constant(1.0) + 1))"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=tf_output.unquieted_env(**env),
    )


@pytest.mark.parametrize(
    "start, expected",
    [
        # A stage's start-up: Keras loads without scikit-learn; the import's objects frozen.
        (
            "from mnist_pipeline import startup; startup.load_tensorflow()",
            ["absent", "True", "(4, 2)", "no wrappers"],
        ),
        # A process that imported scikit-learn first keeps it, and Keras' wrappers.
        (
            "import sklearn; from mnist_pipeline import startup; startup.load_tensorflow()",
            ["module", "True", "(4, 2)", "wrappers"],
        ),
        # Importing the library alone changes nothing: no block, nothing frozen.
        ("import mnist_pipeline.training.models", ["module", "False", "(4, 2)", "wrappers"]),
    ],
)
def test_only_load_tensorflow_skips_scikit_learn_and_freezes(start, expected):
    out = _python(PROBE.format(start=start))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-4:] == expected


@pytest.mark.parametrize("stage", ["train", "evaluate", "sweep"])
def test_a_stage_file_imports_no_tensorflow_before_load_tensorflow(stage):
    """Its start-up lines are filtered only if `load_tensorflow` imports it first."""
    done = _python(
        "import runpy, sys\n"
        f"runpy.run_path({str(ROOT / 'pipelines' / f'{stage}.py')!r}, run_name='probe')\n"
        "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_tensorflow_starts_without_its_cpp_start_up_lines_unless_debugging():
    start = "from mnist_pipeline import startup; startup.prepare(); startup.load_tensorflow(); "
    quiet = _python(start + LOAD)
    debug = _python(start + LOAD, **{DEBUG_ENV: "1"})
    for done in (quiet, debug):
        assert done.returncode == 0 and done.stdout.strip() == "2.0", done.stderr[-2000:]
    assert tf_output.found(quiet.stderr) == [], quiet.stderr
    if not tf_output.printed_here():
        pytest.skip("this TensorFlow prints no start-up lines on this machine")
    assert tuple(tf_output.found(debug.stderr)) == tf_output.printed_here()


def test_every_other_line_written_meanwhile_gets_through():
    done = _python("""
import os, sys
from mnist_pipeline import startup
with startup.without_startup_lines():
    os.write(2, b"I0000 00:00:1795948084.286302   15343 port.cc:153] oneDNN custom operations "
                b"are on. You may see slightly different numerical results.\\n")
    os.write(2, b"E0000 00:00:1795948249.999413   17739 cuda_platform.cc:52] failed call to "
                b"cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\\n")
    os.write(2, b"E0000 00:00:1795948249.999413   17739 some_kernel.cc:7] a real problem\\n")
    print("from Python", file=sys.stderr)
print("after", file=sys.stderr)
""")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "E0000 00:00:1795948249.999413   17739 some_kernel.cc:7] a real problem",
        "from Python",
        "after",
    ]


def test_what_came_before_a_crash_while_loading_still_gets_through():
    done = _python("""
import os
from mnist_pipeline import startup
with startup.without_startup_lines():
    os.write(2, b"F0000 00:00:1.0   1 loader.cc:1] Check failed: the library is broken\\n")
    os.abort()
""")
    assert done.returncode != 0
    assert "Check failed: the library is broken" in done.stderr


EXIT_PROBE = """
import atexit, os, sys, tempfile
from mnist_pipeline import startup
startup.exit_promptly()
folder = tempfile.TemporaryDirectory()
print(folder.name)
atexit.register(lambda: print("atexit handler ran", flush=True))
with open(os.path.join(sys.argv[1], "written.txt"), "w") as out:
    out.write("closed as the stages close what they write")


class Collected:
    def __del__(self):
        with open(os.path.join(sys.argv[1], "collected.txt"), "w") as fh:
            fh.write("the final collection ran")


garbage = Collected()
garbage.itself = garbage  # only a collection frees it
del garbage
print("last line")
"""


@pytest.mark.parametrize("debugging", [False, True])
def test_exit_skips_only_the_final_collection(tmp_path, debugging):
    env = {DEBUG_ENV: "1"} if debugging else {}
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=tf_output.unquieted_env(**env),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    # atexit handlers run, temporary folders are removed, output is flushed.
    assert lines[1:] == ["last line", "atexit handler ran"]
    assert not os.path.exists(lines[0])
    assert (tmp_path / "written.txt").read_text() == "closed as the stages close what they write"
    # The final collection (of reference cycles): skipped, except when debugging.
    assert (tmp_path / "collected.txt").exists() == debugging
