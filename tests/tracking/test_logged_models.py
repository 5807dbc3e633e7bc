"""The served model: a pyfunc running the ONNX export, predicting what Keras predicts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import config as test_config
from helpers.digits import synthetic_digits

from mnist_pipeline.errors import ModelError
from mnist_pipeline.evaluation import promotion
from mnist_pipeline.tracking import logged_models
from mnist_pipeline.training import calibration, job, models


@pytest.fixture(autouse=True)
def _float32_models():
    yield from test_config.float32_models()


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


def logged(model: keras.Model) -> str:
    """The model logged as the train stage logs it: ONNX export, .keras file, calibration."""
    return job.log_served(model, calibration.IDENTITY)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_served_pyfunc_predicts_the_keras_probabilities(tracking, name):
    model = built(name)
    uri = logged(model)
    served = logged_models.load_pyfunc(uri)
    assert "keras" not in served.metadata.flavors  # the pyfunc, not MLflow's Keras flavour
    images, _ = synthetic_digits(300, seed=5)
    for size in (1, 7, 256, 300):  # every batch size through the one ONNX graph
        probabilities = served.predict(images[:size])
        assert probabilities.dtype == np.float32 and probabilities.shape == (size, 10)
        expected = model.predict(images[:size], verbose=0)
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)
        assert (probabilities.argmax(1) == expected.argmax(1)).all()
    # It runs the copy of mnist_onnx.py logged in the model's code, not this package's.
    runtime = served.model.unwrap_python_model().model
    assert type(runtime).__name__ == "OnnxDigitModel" and type(runtime).__module__ == "mnist_onnx"


def test_onnx_served_model_applies_its_calibration(tracking):
    model = built("mlp")
    fitted = dataclasses.replace(calibration.IDENTITY, temperature=0.5, threshold=0.7)
    served = logged_models.load_pyfunc(job.log_served(model, fitted))
    images, _ = synthetic_digits(20, seed=4)
    np.testing.assert_allclose(
        served.predict(images), calibration.scale(model.predict(images, verbose=0), 0.5), atol=1e-5
    )
    assert served.threshold == 0.7


def test_onnx_served_model_needs_no_tensorflow(tracking):
    """Its pip requirements leave TensorFlow and Keras out, and loading and predicting in a
    fresh process imports neither."""
    import mlflow

    uri = logged(built("cnn"))
    folder = mlflow.artifacts.download_artifacts(uri, dst_path=str(tracking / "model"))
    requirements = (tracking / "model" / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "mlflow==" in requirements
    assert "tensorflow" not in requirements and "keras" not in requirements
    script = (
        "import sys, numpy as np, mlflow\n"
        f"model = mlflow.pyfunc.load_model({folder!r})\n"
        "print(model.predict(np.zeros((3, 28, 28), np.uint8)).shape)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["(3, 10)", "[]"]


def test_signature_is_uint8_images_to_float32_probabilities(tracking):
    served = logged_models.load_pyfunc(logged(built("mlp")))
    inputs = served.metadata.get_input_schema().inputs[0]
    outputs = served.metadata.get_output_schema().inputs[0]
    assert (inputs.type, inputs.shape) == (np.dtype(np.uint8), (-1, 28, 28))
    assert (outputs.type, outputs.shape) == (np.dtype(np.float32), (-1, 10))
    with pytest.raises(ModelError, match="prediction refused"):
        served.predict(np.zeros((2, 28, 28), np.float32))  # MLflow's signature check


@pytest.mark.parametrize("flavour", ["pyfunc", "keras"])
def test_the_keras_model_comes_back_from_either_flavour(tracking, flavour):
    model = built("mlp")
    log = logged if flavour == "pyfunc" else logged_models.log_keras_flavour
    again = promotion.load_keras(log(model))  # logged_models.keras_file_in, models.load
    images, _ = synthetic_digits(8, seed=6)
    np.testing.assert_allclose(
        again.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6
    )


def test_a_model_folder_without_a_keras_file_is_refused(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="models:/m/1: no .keras file"):
        logged_models.keras_file_in(tmp_path, "models:/m/1")


def trained(name: str) -> keras.Model:
    """`built(name)` trained for a few epochs on synthetic digits: confident, as a model the
    train stage logs is (an untrained model's near-ties would flip under any rounding)."""
    model = built(name)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    images, labels = synthetic_digits(600, seed=6)
    model.fit(images, labels, epochs=4, batch_size=32, verbose=0)
    return model


@pytest.mark.slow  # it trains two small models
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_int8_graph_is_logged_beside_with_its_parity(tracking, name):
    """Given calibration images, the served model carries the graph quantized to int8
    (weights a quarter of the float graph's), and the gate's parity measures it: the same
    labels as Keras on the test images, accuracy within the servable gap."""
    from mnist_pipeline.data.splits import Split
    from mnist_pipeline.evaluation import gate
    from mnist_pipeline.tracking import mnist_onnx

    model = trained(name)
    val, _ = synthetic_digits(200, seed=7)
    uri = job.log_served(model, calibration.IDENTITY, int8_images=val)
    folder = logged_models.load_pyfunc(uri).folder
    int8, float32 = folder / mnist_onnx.INT8_FILE, folder / mnist_onnx.ONNX_FILE
    assert int8.is_file()
    if name == "mlp":  # nearly all of it is weights
        assert int8.stat().st_size < 0.4 * float32.stat().st_size
    test = Split(*synthetic_digits(500, seed=8))
    parity = promotion.served_parity(uri, test, model.predict(test.images, verbose=0))
    assert parity.disagreements == 0 and parity.int8 is not None, parity
    assert parity.int8.error == "" and parity.int8.agreement >= 0.99, parity.int8
    assert abs(parity.int8.served_accuracy - parity.int8.keras_accuracy) <= 0.01, parity.int8
    assert "the int8 graph's labels differ on" in gate.int8_servable(parity)[1]
    # The int8 runtime answers every batch size, calibrated like the float one.
    runtime = mnist_onnx.OnnxDigitModel(folder, precision="int8")
    assert runtime.predict(test.images[:1]).shape == (1, 10)
    np.testing.assert_allclose(runtime.predict(test.images[:7]).sum(axis=1), 1, atol=1e-5)


def test_onnx_int8_graph_needs_uint8_images_and_is_optional(tracking, tmp_path):
    model = built("mlp")
    models.export_onnx(model, tmp_path / "model.onnx")
    floats = np.zeros((10, 28, 28), np.float32)
    with pytest.raises(ModelError, match=r"expected uint8 images \(N, 28, 28\).*float32"):
        models.quantize_onnx(tmp_path / "model.onnx", tmp_path / "model.int8.onnx", floats)
    with pytest.raises(ModelError, match="model.onnx: could not quantize to int8"):
        models.quantize_onnx(
            tmp_path / "missing" / "model.onnx",
            tmp_path / "q.onnx",
            np.zeros((1, 28, 28), np.uint8),
        )
    assert not (tmp_path / "model.int8.onnx").exists() and not (tmp_path / "q.onnx").exists()
    # Without calibration images (the default) no int8 graph is logged, and none is measured.
    uri = logged(model)
    from mnist_pipeline.tracking import mnist_onnx

    assert not (logged_models.load_pyfunc(uri).folder / mnist_onnx.INT8_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no int8 graph"):
        mnist_onnx.OnnxDigitModel(logged_models.load_pyfunc(uri).folder, precision="int8")


def test_onnx_int8_graph_that_cannot_be_made_or_run_never_stops_the_model(
    tracking, tmp_path, monkeypatch, capsys
):
    """A quantizer failure logs the model without its int8 graph, with a warning; a graph
    ONNX Runtime cannot load is measured as an error, and the float graph's parity stands."""
    from mnist_pipeline.data.splits import Split
    from mnist_pipeline.tracking import mnist_onnx

    model = built("mlp")
    images, labels = synthetic_digits(50, seed=2)

    def fails(source, path, images):
        raise ModelError(f"{source}: could not quantize to int8: unsupported operator")

    monkeypatch.setattr(models, "quantize_onnx", fails)
    uri = job.log_served(model, calibration.IDENTITY, int8_images=images)
    assert "train: WARNING: no int8 graph: " in capsys.readouterr().err
    assert not (logged_models.load_pyfunc(uri).folder / mnist_onnx.INT8_FILE).exists()
    monkeypatch.undo()

    model.save(tmp_path / "model.keras")
    models.export_onnx(model, tmp_path / "model.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not an onnx graph")
    uri = logged_models.log_served_model(
        tmp_path / "model.keras", tmp_path / "model.onnx", int8_file=tmp_path / "garbage.onnx"
    )
    test = Split(images, labels)
    parity = promotion.served_parity(uri, test, model.predict(images, verbose=0))
    assert parity.error == "" and parity.disagreements == 0
    assert parity.int8 is not None and parity.int8.error.startswith("could not run it: ")
