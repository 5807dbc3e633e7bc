"""Models in MLflow: logging the served model with its signature, loading one back as pyfunc.

`log_served_model` logs what is served: the pyfunc of `served_model.py` (models from code),
which runs the version's ONNX export in ONNX Runtime, with the `.keras` file it came from and
its calibration beside it. `log_keras_flavour` logs MLflow's Keras flavour (what earlier
versions logged; the serving benchmark compares them). `keras_file_in` finds the `.keras`
file in either, once downloaded; loading it is `training.models.load`'s (safe mode), which
`evaluation.promotion.load_keras` calls: tracking sits below training.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from .store import retry

# Exact versions the served model needs to load (fast: no dependency inference). No
# TensorFlow: the environment `mlflow models serve` builds for it stays small.
MODEL_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy")
# What MLflow's Keras flavour needs (log_keras_flavour).
KERAS_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")


# --- models --------------------------------------------------------------------------------


def pinned_requirements(names: tuple[str, ...] = MODEL_REQUIREMENTS) -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def image_signature():
    """Input: raw uint8 images (N, 28, 28). Output: float32 class probabilities (N, 10)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_served_model(
    keras_file: str | Path,
    onnx_file: str | Path,
    *,
    calibration: Mapping[str, Any] | None = None,
    name: str = "model",
    tags: Mapping[str, str] | None = None,
    int8_file: str | Path | None = None,
) -> str:
    """Log the served pyfunc around `onnx_file` (what answers), `keras_file` (what it was
    exported from), `calibration` (temperature and abstention threshold; none: raw
    probabilities, every answer stands) and `int8_file` (the graph quantized to int8, if
    made: `make serve ARGS=--int8` serves it); return its `models:/` URI."""
    import mlflow

    from ..files import write_json
    from . import mnist_onnx, served_model

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests an input example; logging one fails in MLflow 3.17.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        folder = Path(tmp)  # the names mnist_onnx.OnnxDigitModel reads
        shutil.copyfile(keras_file, folder / "model.keras")
        shutil.copyfile(onnx_file, folder / mnist_onnx.ONNX_FILE)
        write_json(
            folder / mnist_onnx.CALIBRATION_FILE,
            dict(calibration or {"temperature": 1.0, "threshold": 0.0}),
        )
        artifacts = {
            served_model.KERAS_ARTIFACT: str(folder / "model.keras"),
            served_model.ONNX_ARTIFACT: str(folder / mnist_onnx.ONNX_FILE),
            served_model.CALIBRATION_ARTIFACT: str(folder / mnist_onnx.CALIBRATION_FILE),
        }
        if int8_file is not None:
            shutil.copyfile(int8_file, folder / mnist_onnx.INT8_FILE)
            artifacts[served_model.INT8_ARTIFACT] = str(folder / mnist_onnx.INT8_FILE)
        info = retry(
            lambda: mlflow.pyfunc.log_model(
                name=name,
                python_model=served_model.__file__,
                artifacts=artifacts,
                code_paths=[mnist_onnx.__file__],
                signature=image_signature(),
                pip_requirements=pinned_requirements(),
                tags=dict(tags or {}),
            )
        )
    return info.model_uri


def log_keras_flavour(
    model: Any, name: str = "model", tags: Mapping[str, str] | None = None
) -> str:
    """Log `model` with MLflow's Keras flavour (served by `model.predict` per request)."""
    import mlflow

    info = retry(
        lambda: mlflow.keras.log_model(
            model,
            name=name,
            signature=image_signature(),
            pip_requirements=pinned_requirements(KERAS_REQUIREMENTS),
            tags=dict(tags or {}),
        )
    )
    return info.model_uri


def load_pyfunc(model_uri: str) -> Any:
    """The model behind `model_uri` through MLflow's generic pyfunc flavour."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise ModelError(f"{model_uri}: {str(err).splitlines()[0]}") from None
    return _PyfuncModel(model)


class _PyfuncModel:
    """A pyfunc model whose prediction errors are `ModelError`s (MLflow's types stay here)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.metadata = model.metadata
        # The Keras flavour calls Keras' predict with its progress bar on, which would land
        # (escape codes and all) among a caller's results and in `dvc repro` logs.
        self.prints = "keras" in model.metadata.flavors

    @property
    def threshold(self) -> float:
        """The confidence below which this model's answers are "unsure" (0.0: it was logged
        without a calibration, every answer stands)."""
        from mlflow.exceptions import MlflowException

        try:
            inner = self.model.unwrap_python_model()
        except MlflowException:  # a flavour's model (Keras): no calibration
            return 0.0
        return float(getattr(inner, "threshold", 0.0))

    @property
    def folder(self) -> Path | None:
        """The folder of the served artifacts its runtime loaded (None: a flavour's model, or
        a version logged before the runtime recorded it)."""
        from mlflow.exceptions import MlflowException

        try:
            runtime = getattr(self.model.unwrap_python_model(), "model", None)
        except MlflowException:
            return None
        folder = getattr(runtime, "folder", None)
        return Path(folder) if folder is not None else None

    def predict(self, data: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            if not self.prints:
                return self.model.predict(data)
            with contextlib.redirect_stdout(io.StringIO()):
                return self.model.predict(data)
        except MlflowException as err:
            raise ModelError(f"prediction refused: {str(err).splitlines()[0]}") from None


def download(model_uri: str, folder: str | Path) -> Path:
    """Every file of the model behind `model_uri`, downloaded into `folder`."""
    import mlflow

    return Path(retry(lambda: mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder))))


def keras_file_in(folder: Path, model_uri: str) -> Path:
    """The `.keras` file in a downloaded model folder (`download`): the served pyfunc's
    artifact, or MLflow's Keras flavour's file."""
    keras_files = sorted((folder / "artifacts").glob("*.keras")) or sorted(
        (folder / "data").glob("*.keras")
    )
    if not keras_files:
        raise ModelError(f"{model_uri}: no .keras file among the model's artifacts")
    return keras_files[0]


def calibration_in(folder: Path) -> dict[str, float] | None:
    """The calibration a downloaded served model applies (None: a model logged without one,
    or with MLflow's Keras flavour)."""
    import json

    from . import mnist_onnx

    path = folder / "artifacts" / mnist_onnx.CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        fitted = json.loads(path.read_text(encoding="utf-8"))
        return {
            "temperature": float(fitted["temperature"]),
            "threshold": float(fitted["threshold"]),
        }
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: not a calibration ({err})") from None
