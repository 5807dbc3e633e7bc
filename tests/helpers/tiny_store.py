"""A tiny tracking store with a `champion`, built with the pipeline's own code.

`build` saves the splits with `save_split` and two corruptions of the test split as the
corrupted suite, trains a small MLP with `job.train`,
writes the train stage's outputs, runs `promotion.evaluate` with a lenient gate (so the
model becomes `champion`), and logs a sweep: a parent run with two nested trials. The
store lives in `root` exactly as the pipeline lays it out, beside the composed params.yaml
(`root` plays the repository root through DVC_ROOT). Also: digits rendered from a font, for the
picture-to-MNIST path.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from helpers import config as test_config
from helpers import empty_store
from mnist_pipeline import config
from mnist_pipeline.config.loading import tracking_config
from mnist_pipeline.data import corruptions, suite
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.errors import ServerError
from mnist_pipeline.serve import imaging
from mnist_pipeline.serve.process import ServerCommand, start, stop, wait_until_ready
from mnist_pipeline.tracking.runs import log_metrics, log_params, run
from mnist_pipeline.tracking.store import connect

TRIALS = ("trial-0", "trial-1")


@dataclass
class Store:
    root: Path
    tracking: config.TrackingConfig
    experiment_id: str
    run_id: str
    run_name: str
    version: str
    parent_run_id: str
    model: Any  # the trained Keras model, for reference predictions
    test: Split
    temperature: float  # the calibration the served model applies
    threshold: float  # its abstention threshold

    def served(self, images: np.ndarray) -> np.ndarray:
        """What the served model answers: the Keras model's probabilities, calibrated."""
        from mnist_pipeline.training.calibration import scale

        return scale(self.model.predict(images, verbose=0), self.temperature)


def synthetic_splits() -> dict[str, Split]:
    """300 / 100 / 100 synthetic digits: enough for a tiny model to be champion."""
    from helpers.digits import synthetic_digits

    return {
        name: Split(*synthetic_digits(n, seed))
        for name, n, seed in (("train", 300, 1), ("val", 100, 2), ("test", 100, 3))
    }


def build(
    root: Path,
    splits: dict[str, Split],
    *,
    epochs: int = 3,
    hidden_units: tuple[int, ...] = (32,),
    learning_rate: float = 0.01,
    run_name: str = "tiny-mlp",
) -> Store:
    from mnist_pipeline.evaluation import promotion  # TensorFlow and MLflow: only here
    from mnist_pipeline.training import job

    root.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_ROOT", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # also undoes MLflow's own export
        patch.chdir(root)
        test_config.write_params(root)
        empty_store.place(root / "mlflow.db")  # the default store, at the root
        processed = root / "data" / "processed"
        for name, split in splits.items():
            save_split(processed, name, split)
        paths_cfg = test_config.values("paths")
        suite.save(
            root / paths_cfg["corrupted"],
            corruptions.generate(splits["test"].images, ["fog", "translate"], seed=0),
            splits["test"],
            seed=0,
        )
        train_job = test_config.train_job(
            paths={key: str(root / value) for key, value in test_config.values("paths").items()},
            model={"name": "mlp", "hidden_units": list(hidden_units)},
            optimizer={"name": "adam", "learning_rate": learning_rate},
            train={
                "epochs": epochs,
                "batch_size": 32,
                "verbose": 0,
                "checkpoint": {"enabled": False},
            },
            runtime={"precision": "float32", "jit_compile": "false", "steps_per_execution": 1},
        )
        paths, tracking_cfg = train_job.paths, train_job.tracking
        outcome = job.train(train_job, run_name=run_name)
        job.write_outputs(outcome, paths)
        lenient = test_config.section(
            "gate",
            min_accuracy=0.0,
            min_class_recall=0.0,
            require_significance=False,
            max_ece=None,
            robustness_margin=None,
        )
        decision = promotion.evaluate(
            paths,
            test_config.section("evaluate", batch_size=256, misclassified_grid=4),
            lenient,
            tracking_cfg,
        )
        assert decision.champion_after == decision.version, decision.line
        experiment_id = connect(tracking_cfg)
        with run(experiment_id, run_name="sweep-parent", tags={"sweep": "tiny"}) as parent_run_id:
            for index, trial in enumerate(TRIALS):
                with run(experiment_id, run_name=trial, parent_run_id=parent_run_id):
                    log_params({"optimizer.learning_rate": 0.01 * (index + 1)})
                    log_metrics({"val_accuracy": 0.5 + 0.1 * index}, step=1)
            log_metrics({"best_val_accuracy": 0.6})
    return Store(
        root=root,
        tracking=tracking_cfg,
        experiment_id=experiment_id,
        run_id=outcome.run_id,
        run_name=run_name,
        version=decision.version,
        parent_run_id=parent_run_id,
        model=outcome.model,
        test=splits["test"],
        temperature=outcome.calibration.temperature,
        threshold=outcome.calibration.threshold,
    )


@contextlib.contextmanager
def running(command: ServerCommand, log_path: Path, timeout_s: float = 300) -> Iterator[float]:
    """Run a server for the duration of the block; yields its start-up time in seconds."""
    with open(log_path, "wb") as log:
        process = start(command, log=log)
        try:
            try:
                elapsed = wait_until_ready(process, command.ready_url, timeout_s)
            except ServerError as err:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"{err}\n--- server output ({log_path}) ---\n{tail}")
            yield elapsed
        finally:
            stop(process)


@contextlib.contextmanager
def server(
    store: Store, command_for: Callable[[config.TrackingConfig, int], ServerCommand], log_path: Path
) -> Iterator[tuple[ServerCommand, int]]:
    """The server `command_for(tracking config, free port)` builds for `store`'s repository,
    run as `make ui` / `make serve` run it there; yields the command and its port."""
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_ROOT", str(store.root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        command = command_for(tracking_config(store.root), port)
        with running(command, log_path):
            yield command, port


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- digits drawn with a font ----------------------------------------------------------------


def render_digit(
    digit: int,
    *,
    size: int = 160,
    canvas: tuple[int, int] = (300, 260),
    at: tuple[int, int] = (70, 20),
    ink: int = 0,
    paper: int = 255,
    angle: float = 0.0,
    stroke: int = 0,
) -> Image.Image:
    """`digit` drawn with Pillow's built-in font on a grayscale canvas."""
    image = Image.new("L", canvas, paper)
    ImageDraw.Draw(image).text(
        at,
        str(digit),
        fill=ink,
        font=ImageFont.load_default(size=size),
        stroke_width=stroke,
        stroke_fill=ink,
    )
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=paper)
    return image


def glyph_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` MNIST-format digits: font glyphs in varied sizes, weights, angles and places,
    converted by `imaging.to_mnist` (what `mnist-predict` feeds the model)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        size = int(rng.integers(40, 90))
        at = (int(rng.integers(5, size // 2)), int(rng.integers(0, size // 3)))
        picture = render_digit(
            int(label),
            size=size,
            canvas=(2 * size, 2 * size),
            at=at,
            angle=float(rng.uniform(-12, 12)),
            stroke=int(rng.integers(0, 3)),
        )
        images[i] = imaging.to_mnist(np.asarray(picture, dtype=np.float32))
    return images, labels
