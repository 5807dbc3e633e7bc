"""Models in MLflow: logging a Keras model with its signature, loading one back as pyfunc.

`log_keras_model` logs what is served: the pyfunc of `served_model.py` (models from code)
around the `.keras` file. `log_keras_flavour` logs MLflow's Keras flavour (what earlier
versions logged; the serving benchmark compares the two). `load_keras` reads either back.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from .store import retry

# Exact versions the logged model needs to load (fast: no dependency inference).
MODEL_REQUIREMENTS = ("mlflow", "keras", "tensorflow", "numpy")


# --- models --------------------------------------------------------------------------------

def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_REQUIREMENTS]


def image_signature():
    """Input: raw uint8 images (N, 28, 28). Output: float32 class probabilities (N, 10)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))


def log_keras_model(model: Any, name: str = "model",
                    tags: Mapping[str, str] | None = None,
                    calibration: Mapping[str, Any] | None = None) -> str:
    """Log `model` as the served pyfunc (its `.keras` file inside, and the `calibration` it
    applies: temperature and abstention threshold); return its `models:/` URI."""
    import mlflow

    from ..files import write_json
    from . import served_model

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests an input example; logging one fails in MLflow 3.17.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        keras_file = Path(tmp) / "model.keras"
        model.save(keras_file)
        artifacts = {served_model.KERAS_ARTIFACT: str(keras_file)}
        if calibration is not None:
            calibration_file = Path(tmp) / "calibration.json"
            write_json(calibration_file, dict(calibration))
            artifacts[served_model.CALIBRATION_ARTIFACT] = str(calibration_file)
        info = retry(lambda: mlflow.pyfunc.log_model(
            name=name, python_model=served_model.__file__, artifacts=artifacts,
            signature=image_signature(), pip_requirements=pinned_requirements(),
            tags=dict(tags or {})))
    return info.model_uri


def log_keras_flavour(model: Any, name: str = "model",
                      tags: Mapping[str, str] | None = None) -> str:
    """Log `model` with MLflow's Keras flavour (served by `model.predict` per request)."""
    import mlflow

    info = retry(lambda: mlflow.keras.log_model(
        model, name=name, signature=image_signature(), pip_requirements=pinned_requirements(),
        tags=dict(tags or {})))
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

    def predict(self, data: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            if not self.prints:
                return self.model.predict(data)
            with contextlib.redirect_stdout(io.StringIO()):
                return self.model.predict(data)
        except MlflowException as err:
            raise ModelError(f"prediction refused: {str(err).splitlines()[0]}") from None


def load_keras(model_uri: str) -> Any:
    """The Keras model behind `model_uri`: the served pyfunc's `.keras` artifact (loaded in
    safe mode), or a model logged with MLflow's Keras flavour."""
    import mlflow

    from ..training import models  # here: training imports this module

    if "keras" in mlflow.models.get_model_info(model_uri).flavors:
        return mlflow.keras.load_model(model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(retry(lambda: mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)))
        keras_files = sorted((folder / "artifacts").glob("*.keras"))
        if not keras_files:
            raise ModelError(f"{model_uri}: no .keras file among the model's artifacts")
        return models.load(keras_files[0])


def scoring_app(model_uri: str) -> tuple[Any, _PyfuncModel]:
    """MLflow's own scoring app (what `mlflow models serve` runs) for the model at `model_uri`,
    and the pyfunc model it serves."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    try:
        model = retry(lambda: scoring_server.load_model_with_mlflow_config(model_uri))
    except MlflowException as err:
        raise ModelError(f"{model_uri}: {str(err).splitlines()[0]}") from None
    return scoring_server.init(model), _PyfuncModel(model)
