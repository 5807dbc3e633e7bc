"""The served model without TensorFlow: the ONNX export of a model version run by ONNX Runtime,
with the calibration the version carries.

A model version's served artifacts are a folder holding `model.onnx` (the Keras model
exported at train time, proven equal to it by the gate's parity rule), `calibration.json`
(the temperature fitted on the validation split and the abstention threshold), for lineage
only `model.keras`, and, for versions trained since it exists, `model.int8.onnx`: the same
graph quantized to int8 at train time (`training.models.quantize_onnx`), with its own
parity figures in the gate's verdict. `OnnxDigitModel(folder)` answers uint8 (N, 28, 28)
images with calibrated float32 probabilities (N, 10); `precision="int8"` runs the int8 graph
with the same calibration.

Self-contained on purpose (NumPy, ONNX Runtime and the standard library only): the model
server, `mnist-predict` and the MLflow pyfunc (`tracking/served_model.py`, which carries a
copy of this file in the logged model's code) all run this same code, and none of them loads
TensorFlow or MLflow to answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
PRECISIONS = {"float32": ONNX_FILE, "int8": INT8_FILE}  # which graph answers
CALIBRATION_FILE = "calibration.json"
IMAGE_SHAPE = (28, 28)
# Inference threads: `<intra>[,<inter>]` overrides ONNX Runtime's default (all cores, one
# inter-op thread: a small model has no parallel branches worth scheduling).
THREADS_ENV = "MNIST_SERVE_THREADS"


class ModelInputError(ValueError):
    """Images that are not uint8 (N, 28, 28)."""


def threads(spec: str | None = None) -> tuple[int, int]:
    """(intra-op, inter-op) threads from `spec` or $MNIST_SERVE_THREADS; 0 = all cores."""
    text = os.environ.get(THREADS_ENV, "") if spec is None else spec
    intra, _, inter = text.partition(",")
    try:
        return (int(intra) if intra.strip() else 0, int(inter) if inter.strip() else 1)
    except ValueError:
        raise ValueError(
            f"{THREADS_ENV}: got {text!r}, expected '<intra>[,<inter>]' (integers)"
        ) from None


def calibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row, as float32 (training.calibration.scale's formula),
    computed as p^(1/T) / sum(p^(1/T)): the same numbers in half the NumPy calls, which is
    most of what it costs on a request's few rows. p >= 1/10 for a row's largest entry, so
    the sum stays far from underflow for every T the fit allows (0.05..20)."""
    if temperature == 1.0:
        return np.asarray(probabilities, dtype=np.float32)
    scaled = np.power(
        np.maximum(np.asarray(probabilities, dtype=np.float64), np.finfo(np.float32).tiny),
        1.0 / temperature,
    )
    scaled /= scaled.sum(axis=1, keepdims=True)
    return scaled.astype(np.float32)


def check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ModelInputError(
            f"expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    return images


class OnnxDigitModel:
    """One ONNX Runtime session over a version's served artifacts."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        thread_spec: str | None = None,
        precision: str = "float32",
    ) -> None:
        import onnxruntime

        folder = Path(folder)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: got {precision!r}, expected one of {sorted(PRECISIONS)}")
        graph = folder / PRECISIONS[precision]
        if precision == "int8" and not graph.is_file():  # float32: ONNX Runtime says it
            raise FileNotFoundError(
                f"{graph}: this version has no int8 graph (it was trained before they were "
                "made, or its graph could not be quantized): serve its float32 graph"
            )
        self.folder, self.precision = folder, precision
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads(thread_spec)
        options.log_severity_level = 3  # errors only: no graph-optimisation notices
        self.session = onnxruntime.InferenceSession(
            str(graph), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.temperature, self.threshold = 1.0, 0.0
        calibration = folder / CALIBRATION_FILE
        if calibration.exists():
            fitted = json.loads(calibration.read_text(encoding="utf-8"))
            self.temperature = float(fitted["temperature"])
            self.threshold = float(fitted["threshold"])
        self.predict(np.zeros((1, *IMAGE_SHAPE), np.uint8))  # allocate now, not on a request

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, 10) float32 for uint8 images (N, 28, 28)."""
        images = check_images(images)
        if images.shape[0] == 0:
            return np.zeros((0, 10), np.float32)
        raw = self.session.run(None, {self.input_name: images})[0]
        return calibrated(raw, self.temperature)

    def unsure(self, probabilities: np.ndarray) -> np.ndarray:
        """Per row, whether the answer is below the abstention threshold."""
        return np.asarray(probabilities).max(axis=1) < self.threshold
