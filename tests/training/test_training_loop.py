"""The training loop: the same maths and callbacks as Keras' `fit`, batches from shared memory."""

from __future__ import annotations

import math
import os
import re
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import config as test_config
from helpers.digits import synthetic_digits

from mnist_pipeline.data.splits import Split, load_split, save_split
from mnist_pipeline.training import models
from mnist_pipeline.training.callbacks import EpochLine, EpochReport, StopOnNaN, progress
from mnist_pipeline.training.fit import fit
from mnist_pipeline.training.inputs import dataset
from mnist_pipeline.training.loop import EpochLoop, resident, shard_sizes
from mnist_pipeline.training.runtime import Runtime


@pytest.fixture()
def splits(tmp_path):
    # 330 images in batches of 64: five full batches and a partial one of 10.
    for name, n, seed in (("train", 330, 1), ("val", 70, 2)):
        save_split(tmp_path, name, Split(*synthetic_digits(n, seed)))
    return load_split(tmp_path, "train"), load_split(tmp_path, "val")


def _model(learning_rate: float = 0.05, seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = models.build(test_config.section("model", name="mlp", hidden_units=[16]))
    optimizer = test_config.section("optimizer", name="sgd", learning_rate=learning_rate)
    models.compile_model(model, models.build_optimizer(optimizer), "categorical_crossentropy")
    return model


def _loop(model, train, val, **options):
    settings = dict(
        batch_size=64, shuffle=False, seed=5, augment=False, steps_per_call=2, jit_compile=False
    )
    return EpochLoop(model, train, val, **{**settings, **options})


def test_the_loop_trains_exactly_as_keras_fit(splits):
    train, val = splits
    ours, theirs = _model(), _model()
    np.testing.assert_array_equal(ours.get_weights()[0], theirs.get_weights()[0])
    history = _loop(ours, train, val).run([], epochs=3)
    keras_history = theirs.fit(
        dataset(train, batch_size=64),
        validation_data=dataset(val, batch_size=1000),
        epochs=3,
        verbose=0,
        shuffle=False,
    )
    for mine, reference in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-6)
    assert sorted(history.history) == sorted(keras_history.history)
    for key, values in keras_history.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-5, err_msg=key)
    assert int(ours.optimizer.iterations) == int(theirs.optimizer.iterations) == 3 * 6


def test_a_training_step_scores_with_the_models_own_output(splits):
    # Accuracy takes the argmax of what the model outputs (its probabilities), through no
    # private attribute of Keras' tensors.
    train, val = splits
    model = _model()
    loop = _loop(model, train, val)
    x = tf.constant(train.images[:64])
    probabilities = model.predict(x, verbose=0)
    _, scores = loop._step(x, tf.one_hot(train.labels[:64], 10))
    scores = scores.numpy()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(axis=1), probabilities.argmax(axis=1))


def test_every_traced_step_has_a_static_batch_size(splits):
    # 330 images in batches of 64: full batches in one trace, the partial 10 in another.
    train, val = splits
    loop = _loop(_model(), train, val, steps_per_call=4)
    assert loop.calls == [(0, 4, 64), (4, 5, 64), (5, 6, 10)]
    loop.run([], epochs=1)
    shapes = sorted(
        tuple(arg.shape)
        for f in loop._step._list_all_concrete_functions()
        for arg in f.structured_input_signature[0][:1]
    )
    assert shapes == [(10, 28, 28), (64, 28, 28)]


def _matmuls(function: tf.types.experimental.PolymorphicFunction) -> list[int]:
    """Matrix products in each traced graph of `function`, loop bodies included."""
    counts = []
    for concrete in function._list_all_concrete_functions():
        graph = concrete.graph.as_graph_def()
        nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
        counts.append(sum(node.op == "MatMul" for node in nodes))
    return sorted(counts)


@pytest.fixture()
def float32_policy():
    # Float32 compute whatever an earlier test in this process configured (the stage's
    # runtime set-up leaves its bfloat16 policy global), so that rounding stays float32's.
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(before)


@pytest.mark.parametrize("shards", [2, 3])
def test_batch_shards_train_exactly_as_the_whole_batch(splits, shards, float32_policy):
    # Each batch (64, and the partial 10) and the validation batch (70) in shards whose
    # size-weighted losses are summed: the whole batch's gradient, up to float32 rounding.
    train, val = splits
    whole, sharded = _model(), _model()
    reference = _loop(whole, train, val, shuffle=True).run([], epochs=3)
    loop = _loop(sharded, train, val, shuffle=True, shards=shards)
    history = loop.run([], epochs=3)
    for mine, theirs in zip(sharded.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    for key, values in reference.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-5, err_msg=key)
    # The graphs really hold one forward and backward pass per shard (the MLP's two dense
    # layers: 2 products forward, 2 weight gradients and 1 input gradient per pass).
    assert _matmuls(loop._step) == [5 * shards, 5 * shards]
    assert _matmuls(loop._validate) == [2 * shards]
    assert loop.val_calls == [(0, 1, 70)]


def test_batch_shards_take_augmented_batches_and_refuse_batch_normalization(splits):
    train, val = splits
    model = _model()
    loop = _loop(model, train, val, shards=2, augment=True)
    history = loop.run([], epochs=1)
    assert math.isfinite(history.history["loss"][0])
    assert _matmuls(loop._step) == [10, 10]
    keras.utils.set_random_seed(3)
    normalized = models.build(
        test_config.section("model", name="cnn", filters=[4], batch_norm=True, dense_units=0)
    )
    models.compile_model(
        normalized,
        models.build_optimizer(test_config.section("optimizer", name="sgd")),
        "categorical_crossentropy",
    )
    with pytest.raises(ValueError, match="batch normalization"):
        _loop(normalized, train, val, shards=2)
    _loop(normalized, train, val, shards=1).close()


@pytest.mark.parametrize(
    ("size", "shards", "expected"),
    [(128, 2, [64, 64]), (10, 3, [4, 3, 3]), (2, 4, [1, 1]), (70, 1, [70])],
)
def test_shards_are_near_equal_and_never_empty(size, shards, expected):
    assert shard_sizes(size, shards) == expected


def test_each_epoch_is_a_seeded_permutation_of_every_image(splits):
    train, val = splits
    loop = _loop(_model(), train, val, shuffle=True)
    first, second = loop.order(0).numpy(), loop.order(1).numpy()
    assert sorted(first) == list(range(len(train))) == sorted(second)
    assert list(first) != list(second), "a new order every epoch"
    again = _loop(_model(), train, val, shuffle=True).order(1).numpy()
    np.testing.assert_array_equal(again, second)  # fixed by (seed, epoch): resumes see the same


def test_a_nan_loss_stops_at_its_step_and_reports_no_epoch(splits):
    train, val = splits
    nan_guard, reported = StopOnNaN(), []
    report = EpochReport(lambda epoch, logs: reported.append(epoch))
    _loop(_model(learning_rate=1e12), train, val).run([nan_guard, report], epochs=4)
    assert nan_guard.diverged_at is not None
    epoch, batch = nan_guard.diverged_at
    assert epoch == 0 and 0 <= batch < 6
    assert reported == [], "a diverged epoch is neither validated nor reported"


def test_early_stopping_and_plateau_act_through_the_loop(splits):
    train, val = splits
    model = _model(learning_rate=0.08)
    impossible = 1e9  # no epoch improves by this much
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", min_delta=impossible, patience=0, factor=0.5, min_lr=0
        ),
        keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=impossible, patience=2),
    ]
    history = _loop(model, train, val).run(callbacks, epochs=10)
    # The first epoch improves on nothing; the next two do not improve.
    assert len(history.history["loss"]) == 3, "stopped after patience + 1 epochs"
    assert math.isclose(float(model.optimizer.learning_rate), 0.08 * 0.5**2, rel_tol=1e-6)


def test_training_images_are_shared_not_copied(splits):
    train, _ = splits
    images = train.images.copy() if train.images.ctypes.data % 64 else train.images
    shared = resident(images)
    images[0, 0, 0] = 201
    assert int(shared[0, 0, 0]) == 201, "the tensor reads the array's own memory"
    unaligned = np.frombuffer(b"\0" + images.tobytes(), np.uint8, offset=1).reshape(images.shape)
    copied = resident(unaligned)  # read-only and unaligned: copied, still correct
    np.testing.assert_array_equal(copied.numpy(), images)


def test_an_empty_split_is_refused(splits):
    train, _ = splits
    empty = Split(np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8))
    with pytest.raises(ValueError, match="empty train or validation split"):
        _loop(_model(), train, empty)


def test_the_loop_learns(splits):
    train, val = splits
    history = _loop(_model(learning_rate=0.1), train, val, shuffle=True).run([], epochs=8)
    assert history.history["val_accuracy"][-1] > 0.9
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert isinstance(history.history["loss"][0], float)
    assert tf.config.list_logical_devices("CPU")


def test_augmentation_runs_inside_the_loop(splits):
    train, val = splits
    model = _model(learning_rate=0.1)
    history = _loop(model, train, val, shuffle=True, augment=True).run([], epochs=2)
    assert all(math.isfinite(v) for v in history.history["loss"])
    plain = _model(learning_rate=0.1)
    _loop(plain, train, val, shuffle=True).run([], epochs=2)
    assert not np.allclose(model.get_weights()[0], plain.get_weights()[0]), (
        "augmented batches differ from the raw ones"
    )


def test_every_augmentation_runs_under_a_bfloat16_policy(splits):
    """The robust recipe's operations (affine, blur, contrast, noise, erasing) under
    mixed_bfloat16, as `runtime.precision: auto` trains a CNN on a CPU with bfloat16: the
    affine layers must not hand bfloat16 images to the float32 operations after them."""
    from mnist_pipeline.config.schema import AugmentationConfig
    from mnist_pipeline.training.inputs import augmenter

    cfg = AugmentationConfig(
        translate=0.1, rotate=0.05, zoom=0.15, shear=0.1, noise=0.3, blur=0.7, contrast=0.5,
        erase=1.0, photometric_share=0.5,
    )  # fmt: skip
    images, labels = splits[0].images[:64], splits[0].labels[:64]
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        out, same = augmenter(0, cfg)(tf.constant(images), tf.constant(labels))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.uint8 and out.shape == images.shape
    assert np.array_equal(same.numpy(), labels)
    changed = np.mean(out.numpy() != images, axis=(1, 2))
    assert (changed > 0).all(), "every image is moved by the affine step"


@pytest.mark.parametrize("share, low, high", [(0.0, 0.0, 0.0), (0.3, 0.15, 0.45), (1.0, 0.95, 1.0)])
def test_photometric_share_is_the_share_of_images_the_photometric_operations_change(
    splits, share, low, high
):
    from mnist_pipeline.config.schema import AugmentationConfig
    from mnist_pipeline.training.inputs import augmenter

    cfg = AugmentationConfig(
        translate=0.0, rotate=0.0, zoom=0.0, shear=0.0, noise=0.3, blur=0.0, contrast=0.0,
        erase=0.0, photometric_share=share,
    )  # fmt: skip
    images, labels = splits[0].images[:256], splits[0].labels[:256]
    out, _ = augmenter(0, cfg)(tf.constant(images), tf.constant(labels))
    changed = np.mean((out.numpy() != images).any(axis=(1, 2)))
    assert low <= changed <= high, changed


def test_a_closed_loop_lets_go_of_the_images(splits, tmp_path):
    # Its compiled functions hold the loop in a reference cycle; closing it must not wait
    # for a garbage collection to free the images (a sweep worker trains many models).
    train = load_split(tmp_path, "train")
    images = weakref.ref(train.images)
    with _loop(_model(), train, splits[1]) as loop:
        loop.run([], epochs=1)
        assert images() is not None
    del train
    assert images() is None, "the images outlived the closed loop"
    assert loop.train_x is None


@pytest.mark.parametrize(
    "model_changes",
    [
        {
            "name": "cnn",
            "filters": [4],
            "convs_per_block": 1,
            "dense_units": 8,
            "batch_norm": True,
        },  # batch norm: moving statistics
        {"name": "rnn", "cell": "gru", "units": 8},
    ],
    ids=["cnn", "rnn"],
)
def test_every_model_family_trains_through_the_loop(splits, model_changes):
    train, val = splits
    keras.utils.set_random_seed(3)
    model = models.build(test_config.section("model", **model_changes))
    adamw = test_config.section("optimizer", name="adam", weight_decay=1e-4)
    models.compile_model(model, models.build_optimizer(adamw), "categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    shards = 1 if model_changes.get("batch_norm") else 2  # the RNN in shards too
    history = _loop(model, train, val, shuffle=True, shards=shards).run([], epochs=2)
    assert all(math.isfinite(v) for v in history.history["val_loss"])
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert all(changed), "every weight (and batch-norm statistic) is updated"
    assert int(model.optimizer.iterations) == 2 * 6


def test_float16_training_scales_the_loss_through_the_loop(splits):
    # The mixed_float16 policy (GPUs before Ampere) needs Keras' LossScaleOptimizer.
    train, val = splits
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(learning_rate=0.1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = _loop(model, train, val, shuffle=True).run([], epochs=3)
    assert all(math.isfinite(v) for v in history.history["loss"])
    assert history.history["val_accuracy"][-1] > 0.5
    assert int(model.optimizer.iterations) == 3 * 6


def test_under_a_tf_distribute_strategy_keras_fit_trains(splits):
    # Even with a single replica, a strategy's variables are fed by Keras' own loop.
    train, val = splits
    runtime = Runtime(
        precision="float32",
        jit_compile=False,
        device="CPU",
        strategy=tf.distribute.MirroredStrategy(["/cpu:0"]),
        replicas=1,
        deterministic=False,
    )
    tiny = test_config.train_job(
        model={"hidden_units": [8]}, train={"epochs": 2, "verbose": 0, "batch_size": 64}
    )
    result = fit(tiny, runtime, train, val, steps_per_execution=1)
    assert result.epochs_run == 2 and math.isfinite(result.history["val_loss"][-1])
    assert result.model.train_function is not None, "trained by Model.fit"
    default = Runtime(
        precision="float32",
        jit_compile=False,
        device="CPU",
        strategy=tf.distribute.get_strategy(),
        replicas=1,
        deterministic=False,
    )
    result = fit(tiny, default, train, val, steps_per_execution=2)
    assert result.epochs_run == 2 and result.model.train_function is None, "trained by EpochLoop"


def test_validation_runs_the_test_hooks_as_fit_does(splits):
    # Calls (the signal check) and progress bars hook into validation as under Model.fit.
    train, val = splits
    seen = []

    class Record(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append("begin")

        def on_test_batch_end(self, batch, logs=None):
            seen.append("batch")

        def on_test_end(self, logs=None):
            seen.append(("end", sorted(logs)))

    _loop(_model(), train, val).run([Record()], epochs=2)
    assert seen == ["begin", "batch", ("end", ["accuracy", "loss"])] * 2


# --- progress on stdout: Keras' bar on a terminal only, else one plain line per epoch --------

EPOCH_LINE = (
    r"epoch (\d+)/2: loss \d+\.\d{4}, accuracy \d\.\d{4}, "
    r"val_loss \d+\.\d{4}, val_accuracy \d\.\d{4} \(\d+\.\d s\)"
)


@pytest.mark.parametrize(
    "verbose, on_terminal, keras_verbose, lines",
    [
        (0, True, 0, False),
        (0, False, 0, False),
        (1, True, 1, False),  # the progress bar, where a person watches it
        (1, False, 0, True),  # a log (`dvc repro`, CI): plain lines instead of escape codes
        (2, True, 0, True),
        (2, False, 0, True),
    ],
)
def test_train_verbose_picks_the_bar_only_for_a_terminal(
    verbose, on_terminal, keras_verbose, lines, tmp_path
):
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal, open(tmp_path / "log", "w") as log:
        chosen, callbacks = progress(verbose, 2, terminal if on_terminal else log)
    os.close(leader)
    assert chosen == keras_verbose
    assert [type(c) for c in callbacks] == ([EpochLine] if lines else [])


@pytest.mark.parametrize("distributed", [False, True])
def test_fit_prints_one_plain_line_per_epoch_off_a_terminal(splits, capfd, distributed):
    train, val = splits
    strategy = (
        tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else tf.distribute.get_strategy()
    )
    runtime = Runtime(
        precision="float32",
        jit_compile=False,
        device="CPU",
        strategy=strategy,
        replicas=1,
        deterministic=False,
    )
    tiny = test_config.train_job(
        model={"hidden_units": [8]}, train={"epochs": 2, "verbose": 1, "batch_size": 64}
    )
    fit(tiny, runtime, train, val, steps_per_execution=2)
    out = capfd.readouterr().out
    assert "\x1b[" not in out
    epochs = [re.fullmatch(EPOCH_LINE, line) for line in out.splitlines()]
    assert all(epochs), out
    assert [int(m.group(1)) for m in epochs] == [1, 2]
