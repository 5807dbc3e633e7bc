"""What `dvc repro` prints: each stage's own lines and summary, one plain line per epoch, no
escape codes and no TensorFlow C++ start-up lines (back with MNIST_PIPELINE_DEBUG=1)."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import repo, tf_output

from mnist_pipeline.errors import DEBUG_ENV

pytestmark = pytest.mark.slow

SUMMARIES = (
    "fetch: 4 files verified",
    "preprocess: wrote",
    "train: mlp 2 epochs",
    "champion: ",
    "evaluate: test accuracy",
    "gate: PASSED",
)
EPOCH = (
    r"epoch (\d+)/2: loss [\d.]+, accuracy [\d.]+, val_loss [\d.]+, val_accuracy [\d.]+ "
    r"\([\d.]+ s\)"
)


def _dvc(path, *args: str, **env: str) -> str:
    """Both streams of `dvc <args>`, run as a log would capture them (not a terminal), with
    nothing set that quiets TensorFlow."""
    done = subprocess.run(
        ["dvc", *args],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=900,
        env=tf_output.unquieted_env(repo.env(), **env),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_repro_log_is_plain_readable_lines(tmp_path):
    path = repo.make(tmp_path / "repo", train={"verbose": 2}, store=True)
    out = _dvc(path, "repro")
    assert "\x1b[" not in out
    assert tf_output.found(out) == [], out
    lines = out.splitlines()
    assert [m.group(1) for m in map(re.compile(EPOCH).fullmatch, lines) if m] == ["1", "2"], out
    assert not any(line.startswith("Epoch ") for line in lines), "Keras' own epoch lines"
    for summary in SUMMARIES:
        assert sum(line.startswith(summary) for line in lines) == 1, (summary, out)
    # The train stage says only its own lines (not the ONNX converter's progress).
    train = lines[lines.index("Running stage 'train':") + 2 :]
    train = train[: next(i for i, line in enumerate(train) if line.startswith("Updating lock"))]
    strays = [line for line in train if not (line.startswith("train: ") or re.match(EPOCH, line))]
    assert strays == [], out

    debug = _dvc(path, "repro", "--force", "--single-item", "train", **{DEBUG_ENV: "1"})
    assert tuple(tf_output.found(debug)) == tf_output.printed_here()
    assert len(re.findall(EPOCH, debug)) == 2
