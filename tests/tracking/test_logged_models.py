"""The served model: a pyfunc around the .keras file, predicting what Keras predicts."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from helpers import config as test_config
from helpers.digits import synthetic_digits

from mnist_pipeline.errors import ModelError
from mnist_pipeline.tracking import logged_models, served_model
from mnist_pipeline.training import models


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """An active run in a fresh SQLite store (an earlier test may have set another URI)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.set_experiment("logged-models")
        with mlflow.start_run(experiment_id=experiment.experiment_id):
            yield tmp_path
    finally:
        mlflow.set_tracking_uri(previous)


def built(name: str) -> keras.Model:
    """A model as the builders make it, with random (not trained) weights."""
    keras.utils.set_random_seed(3)
    changes = {"hidden_units": [32]} if name == "mlp" else {"filters": [8, 16]}
    return models.build(test_config.section("model", name=name, **changes))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_served_pyfunc_predicts_the_keras_probabilities(tracking, name):
    model = built(name)
    uri = logged_models.log_keras_model(model)
    served = logged_models.load_pyfunc(uri)
    assert "keras" not in served.metadata.flavors  # the pyfunc, not MLflow's Keras flavour
    images, _ = synthetic_digits(300, seed=5)
    for size in (1, 7, 256, 300):  # every batch size through the one traced function
        probabilities = served.predict(images[:size])
        assert probabilities.dtype == np.float32 and probabilities.shape == (size, 10)
        np.testing.assert_allclose(probabilities, model.predict(images[:size], verbose=0),
                                   atol=1e-5)
    infer = served.model.unwrap_python_model()._infer
    assert infer.experimental_get_tracing_count() == 1  # no retracing across batch sizes


def test_signature_is_uint8_images_to_float32_probabilities(tracking):
    served = logged_models.load_pyfunc(logged_models.log_keras_model(built("mlp")))
    inputs = served.metadata.get_input_schema().inputs[0]
    outputs = served.metadata.get_output_schema().inputs[0]
    assert (inputs.type, inputs.shape) == (np.dtype(np.uint8), (-1, 28, 28))
    assert (outputs.type, outputs.shape) == (np.dtype(np.float32), (-1, 10))
    with pytest.raises(ModelError, match="prediction refused"):
        served.predict(np.zeros((2, 28, 28), np.float32))  # MLflow's signature check


@pytest.mark.parametrize("flavour", ["pyfunc", "keras"])
def test_the_keras_model_comes_back_from_either_flavour(tracking, flavour):
    model = built("mlp")
    log = logged_models.log_keras_model if flavour == "pyfunc" else \
        logged_models.log_keras_flavour
    again = logged_models.load_keras(log(model))
    images, _ = synthetic_digits(8, seed=6)
    np.testing.assert_allclose(again.predict(images, verbose=0),
                               model.predict(images, verbose=0), atol=1e-6)


def test_a_lambda_layer_in_the_artifact_is_refused_at_load(tmp_path):
    inputs = keras.Input((28, 28), dtype="uint8")
    x = keras.layers.Lambda(lambda t: t * 2.0, name="sneaky")(keras.layers.Flatten()(inputs))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="refused: .*sneaky"):
        served_model.load_keras_safely(str(path))
    assert served_model._bytecode_layers(json.loads(json.dumps(
        {"layers": [{"class_name": "Dense"}, {"class_name": "Lambda",
                                               "config": {"name": "f"}}]}))) == ["f"]
