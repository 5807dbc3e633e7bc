"""Models in MLflow: logging a Keras model with its signature, loading one back as pyfunc.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
from collections.abc import Mapping
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


def log_keras_model(model: Any, name: str = "model", tags: Mapping[str, str] | None = None) -> str:
    """Log a Keras model (native .keras) with its signature; return its `models:/` URI."""
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

    def predict(self, data: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            # The flavour calls Keras' predict with its progress bar on, which would land
            # (escape codes and all) among a caller's results and in `dvc repro` logs.
            with contextlib.redirect_stdout(io.StringIO()):
                return self.model.predict(data)
        except MlflowException as err:
            raise ModelError(f"prediction refused: {str(err).splitlines()[0]}") from None


def load_keras(model_uri: str) -> Any:
    import mlflow

    return mlflow.keras.load_model(model_uri)
