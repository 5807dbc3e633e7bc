"""The served model: a pyfunc that runs the version's ONNX export in ONNX Runtime.

Logged as MLflow "models from code" (`logged_models.log_served_model`): MLflow copies this
file into the model and runs it when loading, with `mnist_onnx.py` beside it in the model's
code (it imports only numpy, onnxruntime and mlflow, never this package, and never
TensorFlow), so any MLflow deployment target loads the model with the small environment of
its `pip_requirements`. Artifacts: `model.onnx` (what answers), `calibration.json` (the
temperature applied to every answer and the abstention threshold), `model.keras` (the
Keras model it was exported from, for lineage and re-scoring: `evaluation.promotion.load_keras`)
and, when the train stage could make it, `model.int8.onnx` (the graph quantized to int8, which
this pyfunc does not run: `make serve ARGS=--int8` does, once the gate has measured it).

Versions logged before the ONNX export carry their own copy of the earlier code (a
TensorFlow `tf.function` over the `.keras` file) and keep loading with it.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

try:  # loaded by MLflow: the model's code folder is on sys.path
    from mnist_onnx import ModelInputError, OnnxDigitModel
except ImportError:  # imported from this package
    from mnist_pipeline.tracking.mnist_onnx import ModelInputError, OnnxDigitModel

KERAS_ARTIFACT = "keras_model"  # model.keras: lineage and re-scoring
ONNX_ARTIFACT = "onnx_model"  # model.onnx: what answers
CALIBRATION_ARTIFACT = "calibration"  # calibration.json
INT8_ARTIFACT = "onnx_int8_model"  # model.int8.onnx, if made: `make serve ARGS=--int8` serves it


class DigitClassifier(PythonModel):
    """uint8 images (N, 28, 28) -> float32 calibrated class probabilities (N, 10).

    `threshold`: answers whose top probability is below it are "unsure" (callers mark them;
    the probabilities are the answer)."""

    # Requests are checked against the logged uint8 signature, not `predict`'s type hints
    # (MLflow would warn, at every load, that there are none).
    _skip_type_hint_validation = True
    threshold = 0.0

    def load_context(self, context) -> None:
        # The artifacts sit in one folder under the names OnnxDigitModel reads.
        self.model = OnnxDigitModel(Path(context.artifacts[ONNX_ARTIFACT]).parent)
        self.threshold = self.model.threshold

    def predict(self, context, model_input, params=None):
        try:
            return self.model.predict(model_input)
        except ModelInputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


set_model(DigitClassifier())
