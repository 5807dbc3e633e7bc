"""`mnist-predict`: the digit in each picture, by the champion model (or --model-uri).

    mnist-predict three.png photo-of-a-seven.jpg smudge.png
    three.png: 3 (0.998)
    photo-of-a-seven.jpg: 7 (0.941)
    smudge.png: 5 (0.412, unsure)

The number is the model's calibrated confidence (the temperature fitted on the validation
split travels with the model version); an answer below the version's abstention threshold
is marked "unsure" and still given.

Each file is converted to MNIST format (`imaging`); the version's served model (its ONNX
export, in ONNX Runtime: what `make serve` serves, without TensorFlow) is loaded once and
predicts all pictures in one batch. A file that cannot be read as a picture of a digit is
reported on stderr by name and the others are still predicted;
the exit status is 1 if any file failed (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from ..config import TrackingConfig
from ..config.loading import tracking_config
from ..errors import reported
from ..tracking import registry, served_artifacts
from ..tracking.mnist_onnx import OnnxDigitModel
from . import imaging
from .model_server import require_store

PROG = "mnist-predict"


def convert_all(paths: list[str]) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """The files that converted, their uint8 (N, 28, 28) images, and why the others failed."""
    names: list[str] = []
    images: list[np.ndarray] = []
    failed: dict[str, str] = {}
    for path in paths:
        try:
            images.append(imaging.convert(path))
            names.append(path)
        except imaging.ImageError as err:
            failed[path] = str(err)
    batch = np.stack(images) if images else np.zeros((0, 28, 28), dtype=np.uint8)
    return names, batch, failed


def predict(cfg: TrackingConfig, model_uri: str, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Calibrated class probabilities (N, 10) for uint8 images (N, 28, 28), from one model
    load, and the confidence below which an answer is unsure."""
    with tempfile.TemporaryDirectory(prefix="mnist-predict-") as cache:
        model = OnnxDigitModel(served_artifacts.locate(cfg, model_uri, cache).folder)
        return model.predict(images), model.threshold


def answer(name: str, probabilities: np.ndarray, threshold: float) -> str:
    """`three.png: 3 (0.998)`, or `... (0.412, unsure)` below the threshold."""
    digit = int(np.argmax(probabilities))
    confidence = float(probabilities[digit])
    unsure = ", unsure" if confidence < threshold else ""
    return f"{name}: {digit} ({confidence:.3f}{unsure})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="PNG, JPEG, ... pictures of one digit each"
    )
    parser.add_argument(
        "--model-uri", help="default: models:/<tracking.registered_model>@champion from params.yaml"
    )
    args = parser.parse_args(argv)

    with reported(PROG):
        names, images, failed = convert_all(args.files)
        for path, reason in failed.items():
            print(
                f"{PROG}: {reason if reason.startswith(path) else f'{path}: {reason}'}",
                file=sys.stderr,
            )
        if names:
            cfg = tracking_config()
            require_store(cfg)
            model_uri = args.model_uri or registry.champion_uri(cfg.registered_model)
            probabilities, threshold = predict(cfg, model_uri, images)
            for name, row in zip(names, probabilities, strict=True):
                print(answer(name, row, threshold))
        if failed:
            print(f"{PROG}: {len(failed)} of {len(args.files)} files failed", file=sys.stderr)
            return 1
        return 0
    return 1  # not reached: `reported` exits on a PipelineError


if __name__ == "__main__":
    sys.exit(main())
