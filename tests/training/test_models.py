"""Model builders, optimizers and the safe loader."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
from helpers import config as test_config

from mnist_pipeline.errors import ModelError
from mnist_pipeline.training import models


def _model(name: str, **overrides) -> keras.Model:
    return models.build(test_config.section("model", name=name, **overrides))


def test_tutorial_mlp_is_sequential_with_535818_params():
    model = _model("mlp")
    assert isinstance(model, keras.Sequential)
    assert models.count_params(model) == 535_818
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [512, 256, 10]
    assert [layer.activation.__name__ for layer in dense] == ["relu", "relu", "softmax"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn"])
def test_models_take_raw_uint8_images_and_output_probabilities(name):
    model = _model(name)
    assert model.inputs[0].dtype == "uint8" and tuple(model.inputs[0].shape) == (None, 28, 28)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    probs = np.asarray(model.predict(images, verbose=0))
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_rescaling_happens_inside_the_model():
    model = _model("mlp")
    assert isinstance(model.layers[0], keras.layers.Rescaling)
    assert model.layers[0].scale == pytest.approx(1 / 255)


def test_cnn_and_rnn_use_the_functional_api():
    for name in ("cnn", "rnn"):
        model = _model(name)
        assert not isinstance(model, keras.Sequential) and isinstance(model, keras.Model)


def test_cnn_blocks_follow_config():
    model = _model("cnn", filters=[8, 16, 24], convs_per_block=1, batch_norm=False)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 16, 24]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_cnn_with_valid_padding_and_no_hidden_dense_is_keras_example_convnet():
    # Keras' "Simple MNIST convnet": 34,826 parameters, 26x26 -> 13 -> 11 -> 5 (x 64) features.
    model = _model(
        "cnn",
        filters=[32, 64],
        convs_per_block=1,
        batch_norm=False,
        padding="valid",
        dense_units=0,
        dropout=0.5,
    )
    assert models.count_params(model) == 34_826
    assert tuple(model.get_layer("flatten").output.shape) == (None, 5 * 5 * 64)
    assert [
        type(layer).__name__
        for layer in model.layers
        if isinstance(layer, (keras.layers.Dense, keras.layers.Dropout))
    ] == ["Dropout", "Dense"]


def test_rnn_cell_choice():
    model = _model("rnn", cell="gru", units=16, bidirectional=True)
    assert any(isinstance(layer, keras.layers.Bidirectional) for layer in model.layers)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
        ("adam", keras.optimizers.Adam),
    ],
)
def test_optimizers_take_config_arguments(name, cls):
    opt_cfg = test_config.section("optimizer", name=name, learning_rate=0.123)
    optimizer = models.build_optimizer(opt_cfg)
    assert isinstance(optimizer, cls)
    assert float(optimizer.learning_rate) == pytest.approx(0.123)


def test_save_and_safe_load_roundtrip(tmp_path):
    model = _model("mlp", hidden_units=[16])
    path = tmp_path / "model.keras"
    models.save(model, path)
    loaded = models.load(path)
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


@pytest.mark.parametrize("suffix", [".h5", ".pkl", ".pickle", ""])
def test_non_keras_formats_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"anything")
    with pytest.raises(ModelError, match="only the native .keras format"):
        models.load(path)


def test_lambda_layer_is_refused_without_running_its_code(tmp_path):
    canary = tmp_path / "canary"
    inputs = keras.Input((28, 28), dtype="uint8")
    x = keras.layers.Flatten()(inputs)
    # The Lambda's bytecode writes a canary file whenever it runs.
    x = keras.layers.Lambda(
        lambda t, p=str(canary): (__import__("pathlib").Path(p).write_text("ran"), t * 2.0)[1],
        name="sneaky",
    )(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    assert canary.exists(), "building the model ran the lambda once"
    canary.unlink()
    with zipfile.ZipFile(path) as archive:
        cfg = json.loads(archive.read("config.json"))
    assert "sneaky" in json.dumps(cfg)
    with pytest.raises(ModelError, match=r"refused: .*sneaky"):
        models.load(path)
    assert not canary.exists()


def test_corrupt_archive_is_reported(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ModelError, match="not a valid .keras archive"):
        models.load(path)
