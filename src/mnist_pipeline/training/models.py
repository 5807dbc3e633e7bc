"""Keras models: build (uncompiled), optimizers, compile, and the safe loader.

Every model takes raw uint8 28x28 images and rescales inside, so a saved model serves raw
pixels. The output layer computes in float32 even under a mixed-precision policy.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import keras
from keras import layers

from ..config import CNNConfig, MLPConfig, ModelConfig, OptimizerConfig, RNNConfig
from ..errors import ModelError

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)


def build(cfg: ModelConfig, num_classes: int = NUM_CLASSES) -> keras.Model:
    """An uncompiled model for `cfg` (MLP, CNN or RNN)."""
    if isinstance(cfg, MLPConfig):
        return build_mlp(cfg, num_classes)
    if isinstance(cfg, CNNConfig):
        return build_cnn(cfg, num_classes)
    if isinstance(cfg, RNNConfig):
        return build_rnn(cfg, num_classes)
    raise ValueError(
        f"model config: got {type(cfg).__name__}, expected MLPConfig, CNNConfig or RNNConfig"
    )


def batch_statistics(cfg: ModelConfig) -> bool:
    """Whether the model `cfg` describes computes statistics across a batch in training (batch
    normalization), so that a batch cannot be trained in shards (`runtime.batch_shards`)."""
    return isinstance(cfg, CNNConfig) and cfg.batch_norm


def _inputs() -> keras.KerasTensor:
    return keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")


def _classifier(num_classes: int) -> layers.Dense:
    # float32 softmax keeps probabilities and the loss exact under bfloat16 compute.
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")


def build_mlp(cfg: MLPConfig, num_classes: int = NUM_CLASSES) -> keras.Model:
    """The tutorial MLP (Sequential API): 784 -> 512 relu -> 256 relu -> 10 softmax by default."""
    stack: list[layers.Layer] = [
        _inputs(),
        layers.Rescaling(1.0 / 255, name="rescale"),
        layers.Flatten(name="flatten"),
    ]
    for index, units in enumerate(cfg.hidden_units):
        stack.append(layers.Dense(units, activation=cfg.activation, name=f"dense_{index}"))
        if cfg.dropout:
            stack.append(layers.Dropout(cfg.dropout, name=f"dropout_{index}"))
    stack.append(_classifier(num_classes))
    return keras.Sequential(stack, name="mlp")


def build_cnn(cfg: CNNConfig, num_classes: int = NUM_CLASSES) -> keras.Model:
    """Conv blocks (conv[-BN]-act x N, max-pool) and a dense head (Functional API).

    With `convs_per_block: 1`, `batch_norm: false`, `padding: valid`, `dense_units: 0` and
    `filters: [32, 64]` it is Keras' "Simple MNIST convnet" example.
    """
    inputs = _inputs()
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Reshape((*IMAGE_SHAPE, 1), name="add_channel")(x)
    for block, filters in enumerate(cfg.filters):
        for conv in range(cfg.convs_per_block):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(
                filters,
                cfg.kernel_size,
                padding=cfg.padding,
                use_bias=not cfg.batch_norm,
                name=name,
            )(x)
            if cfg.batch_norm:
                x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.Activation(cfg.activation, name=f"{name}_act")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="head_dropout_in")(x)
    if cfg.dense_units:  # 0: the classifier reads the pooled features directly
        x = layers.Dense(cfg.dense_units, activation=cfg.activation, name="head_dense")(x)
        if cfg.dropout:
            x = layers.Dropout(cfg.dropout, name="head_dropout")(x)
    outputs = _classifier(num_classes)(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_rnn(cfg: RNNConfig, num_classes: int = NUM_CLASSES) -> keras.Model:
    """A recurrent layer over the 28 rows (time steps) of 28 pixels each (Functional API)."""
    cell = {"lstm": layers.LSTM, "gru": layers.GRU, "simple": layers.SimpleRNN}[cfg.cell]
    inputs = _inputs()
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    recurrent = cell(cfg.units, dropout=cfg.dropout, name=cfg.cell)
    if cfg.bidirectional:
        recurrent = layers.Bidirectional(recurrent, name=f"bi_{cfg.cell}")
    x = recurrent(x)
    outputs = _classifier(num_classes)(x)
    return keras.Model(inputs, outputs, name="rnn")


def as_float32(model: keras.Model, cfg: ModelConfig) -> keras.Model:
    """The same model with float32 compute, for saving and serving.

    Mixed-precision training keeps its variables in float32, so the weights carry over
    exactly; serving in float32 gives the same answer at any batch size on any hardware.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        exported = build(cfg)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    exported.set_weights(model.get_weights())
    return exported


def build_optimizer(cfg: OptimizerConfig) -> keras.optimizers.Optimizer:
    """The Keras optimizer for `cfg`; its arguments are the config's keys."""
    args = {k: v for k, v in vars(cfg).items() if k != "name"}
    if cfg.name == "sgd":
        return keras.optimizers.SGD(**args)
    if cfg.name == "rmsprop":
        return keras.optimizers.RMSprop(**args)
    if cfg.name == "adam":
        decay = args.pop("weight_decay")
        if args["ema_momentum"]:
            args["use_ema"] = True
        else:
            del args["ema_momentum"]
        if decay:
            return keras.optimizers.AdamW(weight_decay=decay, **args)
        return keras.optimizers.Adam(**args)
    raise ValueError(f"optimizer.name: got {cfg.name!r}, expected 'sgd', 'rmsprop' or 'adam'")


def compile_model(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss: str | keras.losses.Loss,
    *,
    steps_per_execution: int = 1,
    jit_compile: bool | str = "auto",
) -> keras.Model:
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return model


def count_params(model: keras.Model) -> int:
    return int(model.count_params())


def summary(model: keras.Model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), line_length=100)
    return "\n".join(lines)


def save(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """Save in the native `.keras` format, atomically."""
    from ..files import atomic_path

    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def export_onnx(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """The model as an ONNX graph, atomically: uint8 (N, 28, 28) in, probabilities out, for
    ONNX Runtime (Keras' own export, through tf2onnx)."""
    import logging
    import warnings

    import numpy as np

    from ..files import atomic_path

    mixed = sorted({layer.dtype_policy.name for layer in model.layers} - {"float32"})
    if mixed:
        raise ValueError(
            f"export_onnx: the model computes in {', '.join(mixed)}; export its "
            "float32 copy (models.as_float32), which ONNX Runtime runs"
        )
    model(np.zeros((1, *IMAGE_SHAPE), np.uint8))  # Keras exports only a model that has run
    converter = logging.getLogger("tf2onnx")  # its INFO lines would land in the stage's log
    level = converter.level
    converter.setLevel(logging.WARNING)
    try:
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # tf2onnx probes np.object
            model.export(str(tmp), format="onnx", verbose=False)
    finally:
        converter.setLevel(level)


# How many validation images set the int8 graph's activation ranges, fed in batches of 100.
QUANTIZE_IMAGES = 1000


def quantize_onnx(
    source: str | os.PathLike[str], path: str | os.PathLike[str], images: Any
) -> None:
    """An int8 copy of the ONNX graph at `source`, atomically at `path`: ONNX Runtime's static
    quantization (weights int8 per output channel, activations uint8, as QuantizeLinear /
    DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels) of every layer but the
    classifier, its activation ranges measured on up to QUANTIZE_IMAGES of `images` (uint8
    (N, 28, 28): the validation split).

    Static, not dynamic: dynamic quantization measures each call's activations, so an image's
    answer would depend on the other requests batched with it. ModelError when it cannot."""
    import logging
    import tempfile

    import numpy as np
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..files import atomic_path

    images = np.asarray(images)[:QUANTIZE_IMAGES]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ModelError(
            f"quantize_onnx: expected uint8 images (N, 28, 28) to calibrate on, got "
            f"{images.dtype} {images.shape}"
        )
    if len(images) == 0:
        raise ModelError("quantize_onnx: no images to calibrate on")

    class Batches(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.batches = iter([{name: images[i : i + 100]} for i in range(0, len(images), 100)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    root = logging.getLogger()  # ONNX Runtime's quantization logs through the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # Shape inference and graph fusions first, as ONNX Runtime advises: on the tutorial
            # MLP this agreed with the float graph on more test images (99.55% against 99.37%).
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            graph = onnx.load(str(prepared), load_external_data=False).graph
            # The classifier stays float32 from its matrix product on: int8 logits would
            # give probabilities in steps of 1/255, too coarse for the calibration and the
            # abstention threshold (0.99 and above). It is a tenth of a percent of the work.
            nodes = list(graph.node)
            last = max(
                (i for i, node in enumerate(nodes) if node.op_type in ("MatMul", "Gemm", "Conv")),
                default=len(nodes),
            )
            kept_float = [node.name for node in nodes[last:]]
            with atomic_path(path, suffix=".onnx") as out:
                quantize_static(
                    str(prepared),
                    str(out),
                    Batches(graph.input[0].name),
                    quant_format=QuantFormat.QDQ,
                    nodes_to_exclude=kept_float,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
    except Exception as err:  # noqa: BLE001 - the quantizer raises anything; say which graph
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{source}: could not quantize to int8: {first[:300]}") from None
    finally:
        root.setLevel(level)


def load(path: str | os.PathLike[str]) -> keras.Model:
    """Load a `.keras` model in safe mode; refuse anything that could run code from the file.

    Refused: other formats (HDF5, pickles, SavedModel folders), and `.keras` archives whose
    config holds a Lambda layer or another layer serialised as Python bytecode. The config
    is inspected before Keras deserialises anything.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(
            f"{path}: refused: only the native .keras format is loaded "
            f"(got '{path.suffix or 'no extension'}'; HDF5 and pickles can run code)"
        )
    if not path.is_file():
        raise ModelError(f"{path}: model file not found (run the train stage: dvc repro train)")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not a valid .keras archive ({err})") from None
    unsafe = sorted(_unsafe_layers(config))
    if unsafe:
        raise ModelError(
            f"{path}: refused: the model holds layers that would run code from the "
            f"file ({', '.join(unsafe)}); rebuild it without Lambda layers"
        )
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except ValueError as err:
        raise ModelError(
            f"{path}: refused by Keras safe mode: {str(err).splitlines()[0]}"
        ) from None


def _unsafe_layers(node: object) -> set[str]:
    """Names of Lambda layers (or any serialised Python function) anywhere in a config."""
    found: set[str] = set()
    if isinstance(node, dict):
        if node.get("class_name") == "Lambda" or node.get("class_name") == "__lambda__":
            found.add(str(node.get("config", {}).get("name", node.get("class_name"))))
        for value in node.values():
            found |= _unsafe_layers(value)
    elif isinstance(node, list):
        for value in node:
            found |= _unsafe_layers(value)
    return found
