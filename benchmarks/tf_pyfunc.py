"""The baseline of benchmarks/serve_speed.py: the TensorFlow pyfunc `make serve` served before
models were exported to ONNX (the earlier `tracking/served_model.py`, unchanged but for this
paragraph). The benchmark logs it as models-from-code, as the train stage logged it then.

The served model: a pyfunc whose `predict` runs one compiled inference function.

Logged as MLflow "models from code" (`logged_models.log_keras_model`): MLflow copies this
file into the model and runs it when loading, so it is self-contained on purpose (it imports
only mlflow, numpy, keras and tensorflow, never this package): any MLflow deployment target
can load the model. Its only artifact is the `.keras` file, loaded in Keras safe mode after
refusing configs that hold Python bytecode (Lambda layers).

Why not MLflow's Keras flavour: it calls `model.predict` per request, which builds a data
pipeline and a progress bar around every call (~77 ms for one image on 2 CPU cores). One
`tf.function` traced once for a (None, 28, 28) uint8 input answers the same in ~1-2 ms, and
never retraces across batch sizes.
"""

from __future__ import annotations

import json
import os
import zipfile

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

KERAS_ARTIFACT = "keras_model"  # the artifact key of the .keras file
IMAGE_SHAPE = (28, 28)
# Inference threads: `<intra>,<inter>` overrides the measured default (docs/serving.md).
THREADS_ENV = "MNIST_SERVE_THREADS"


def _bytecode_layers(node: object) -> list[str]:
    """Names of layers serialised as Python code (Lambda), anywhere in a Keras config."""
    if isinstance(node, list):
        return [name for item in node for name in _bytecode_layers(item)]
    if not isinstance(node, dict):
        return []
    found = [name for value in node.values() for name in _bytecode_layers(value)]
    if node.get("class_name") in ("Lambda", "__lambda__"):
        found.append(str(node.get("config", {}).get("name", node["class_name"])))
    return found


def load_keras_safely(path: str):
    """A `.keras` file, refusing anything that could run code from it."""
    import keras

    if not str(path).endswith(".keras"):
        raise MlflowException(f"{path}: refused: only the native .keras format is loaded")
    with zipfile.ZipFile(path) as archive:
        unsafe = _bytecode_layers(json.loads(archive.read("config.json")))
    if unsafe:
        raise MlflowException(
            f"{path}: refused: layers that would run code from the file "
            f"({', '.join(sorted(unsafe))})"
        )
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def _set_threads(tf) -> None:
    """One inter-op thread (a small model has no parallel branches worth scheduling) and
    intra-op threads from THREADS_ENV or, by default, TensorFlow's own choice (all cores).
    Must run before TensorFlow creates its runtime (the first op or variable)."""
    spec = os.environ.get(THREADS_ENV, "")
    intra, _, inter = spec.partition(",")
    try:
        threads = (int(intra) if intra else 0, int(inter) if inter else 1)
    except ValueError:
        raise MlflowException(
            f"{THREADS_ENV}: got {spec!r}, expected '<intra>[,<inter>]' (integers)"
        ) from None
    tf.config.threading.set_intra_op_parallelism_threads(threads[0])
    tf.config.threading.set_inter_op_parallelism_threads(threads[1])


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """uint8 images (N, 28, 28) -> float32 class probabilities (N, 10)."""

    # Requests are checked against the logged uint8 signature, not `predict`'s type hints
    # (MLflow would warn, at every load, that there are none).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import tensorflow as tf

        try:
            _set_threads(tf)
        except RuntimeError:
            pass  # TensorFlow already runs (another model in this process): keep its threads
        model = load_keras_safely(context.artifacts[KERAS_ARTIFACT])
        # One trace for every batch size: the batch axis is None in the signature.
        self._infer = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8)],
            reduce_retracing=True,
        )
        self._infer(np.zeros((1, *IMAGE_SHAPE), np.uint8))  # trace now, not on a request

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise MlflowException(
                f"expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        return np.asarray(self._infer(images), dtype=np.float32)


set_model(DigitClassifier())
