"""The config tree: params.yaml equals the composition of conf/, and validation is strict."""

from __future__ import annotations

import json
import shutil
from typing import get_args

import pytest
import yaml
from helpers import config as helpers_config
from helpers.digits import ROOT
from pydantic import BaseModel, ValidationError

from mnist_pipeline import config
from mnist_pipeline.config.compose import compose
from mnist_pipeline.errors import ConfigError, ServerError

SECTIONS = [
    "paths",
    "fetch",
    "preprocess",
    "corrupt",
    "model",
    "optimizer",
    "train",
    "runtime",
    "tracking",
    "evaluate",
    "gate",
    "monitoring",
]


@pytest.fixture(scope="module")
def composed() -> dict:
    return compose(ROOT / "conf")


def test_params_yaml_equals_composed_conf(composed):
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == composed, "params.yaml is stale: run `make params` and commit it"


def test_composed_config_has_only_known_sections(composed):
    assert sorted(composed) == sorted(SECTIONS)


@pytest.mark.parametrize("name", SECTIONS)
def test_every_section_validates(composed, name):
    assert config.section(composed, name) is not None


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


GROUPS = sorted(
    p.name
    for p in (ROOT / "conf").iterdir()
    if p.is_dir() and p.name not in ("experiment", "sweep")
)
EVERY_OPTION = (
    [f"{group}={option}" for group in GROUPS for option in _options(group)]
    + [f"experiment={e}" for e in _options("experiment")]
    + [f"+sweep={s}" for s in _options("sweep")]
)


def test_every_group_has_options():
    assert {"model", "optimizer", "train", "runtime", "fetch"} <= set(GROUPS)
    assert _options("experiment") and _options("sweep")


@pytest.mark.parametrize("override", EVERY_OPTION)
def test_every_option_composes_and_every_section_validates(override):
    cfg = compose(ROOT / "conf", [override])
    expected = SECTIONS + (["sweep"] if override.startswith("+sweep=") else [])
    assert sorted(cfg) == sorted(expected)
    for name in expected:
        assert config.section(cfg, name) is not None
    if override.startswith(("model=", "optimizer=")):
        group, option = override.split("=")
        assert config.section(cfg, group).name == option


def _models(schema) -> list[type[BaseModel]]:
    """Every model class inside `schema`: its members, fields, list items and map values."""
    found: list[type[BaseModel]] = []
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, type) and issubclass(node, BaseModel):
            if node not in found:
                found.append(node)
                stack.extend(f.annotation for f in node.model_fields.values())
        else:
            stack.extend(get_args(node))
    return found


def test_the_schema_holds_no_values():
    models = [m for schema in config.SECTION_SCHEMAS.values() for m in _models(schema)]
    assert len(models) >= 20, [m.__name__ for m in models]
    for model in models:
        assert model.model_config["extra"] == "forbid" and model.model_config["frozen"]
        for name, field in model.model_fields.items():
            assert field.is_required(), f"{model.__name__}.{name} has a default"


def test_defaults_reproduce_the_tutorial(composed):
    model = config.section(composed, "model")
    optimizer = config.section(composed, "optimizer")
    train = config.section(composed, "train")
    assert (model.name, model.hidden_units, model.activation) == ("mlp", [512, 256], "relu")
    assert (optimizer.name, optimizer.learning_rate, optimizer.momentum) == ("sgd", 0.01, 0.0)
    assert (train.batch_size, train.epochs, train.loss) == (128, 20, "categorical_crossentropy")


def _with(composed: dict, dotted: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(composed))
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return data


@pytest.mark.parametrize(
    "dotted, value, expected",
    [
        ("train.batch_size", "abc", "type integer"),
        ("train.batch_size", 0, "[1, 65536]"),
        ("train.epochs", -3, "[1, 10000]"),
        ("train.loss", "hinge", "'categorical_crossentropy'"),
        ("train.bogus", 1, "known keys: batch_size"),
        ("train.early_stopping.patiance", 2, "known keys: enabled, monitor, patience"),
        ("optimizer.learning_rate", -0.1, "> 0"),
        ("optimizer.learning_rate", float("nan"), "finite"),
        ("optimizer.name", "adagrad", "'sgd', 'rmsprop', 'adam'"),
        ("model.name", "transformer", "'mlp', 'cnn', 'rnn'"),
        ("model.hidden_units", [512, 0], "integers >= 1"),
        ("model.dropout", 1.0, "[0, 1)"),
        ("runtime.precision", "fp8", "'mixed_bfloat16'"),
        ("runtime.distribute", "tpu", "'mirrored'"),
        ("preprocess.val_size", 3, ">= 10"),
        ("gate.alpha", 0.0, "(0, 1)"),
        ("gate.min_accuracy", 1.5, "[0, 1]"),
        ("fetch.connect_timeout_s", 0, "> 0"),
        ("fetch.files.train-images-idx3-ubyte", "deadbeef", "64 lowercase hex"),
        ("tracking.registered_model", "has space", "letters, digits"),
    ],
)
def test_bad_values_fail_naming_key_value_and_allowed(composed, dotted, value, expected):
    data = _with(composed, dotted, value)
    with pytest.raises(ConfigError) as info:
        config.section(data, dotted.split(".")[0])
    message = str(info.value)
    assert f"'{dotted}'" in message or dotted.split(".")[-1] in message
    assert expected in message
    if isinstance(value, str):
        assert repr(value) in message


def test_missing_mirror_kind_fields_are_named(composed):
    data = _with(composed, "fetch.mirrors", [{"name": "x", "kind": "npm"}])
    with pytest.raises(ConfigError, match=r"fetch.mirrors\[x\].package"):
        config.section(data, "fetch")


def test_discriminated_sections_name_the_choices(composed):
    data = _with(composed, "model.name", "transformer")
    with pytest.raises(ConfigError) as info:
        config.section(data, "model")
    assert str(info.value) == (
        "config 'model.name': got 'transformer', expected one of 'mlp', 'cnn', 'rnn'"
    )
    data = _with(composed, "optimizer.name", "adam")  # with sgd's keys: adam's are missing
    with pytest.raises(ConfigError, match=r"^config 'optimizer.beta_1': got None, expected "):
        config.section(data, "optimizer")
    data = _with(composed, "optimizer.beta_1", 0.9)  # a key of another option
    with pytest.raises(
        ConfigError,
        match=r"'optimizer.beta_1': got 0.9, expected one of the "
        r"known keys: name, learning_rate, momentum, nesterov$",
    ):
        config.section(data, "optimizer")


def test_a_missing_key_is_named_not_defaulted(composed):
    data = yaml.safe_load(yaml.safe_dump(composed))
    del data["train"]["lr_schedule"]["factor"]
    with pytest.raises(ConfigError) as info:
        config.section(data, "train")
    assert str(info.value) == (
        "config 'train.lr_schedule.factor': got None, expected "
        "a number in (0, 1) (the key is missing)"
    )


def test_cross_field_rules_name_their_key(composed):
    mirror = composed["fetch"]["mirrors"][0]
    with pytest.raises(ConfigError, match=r"'fetch.mirrors': got \['a', 'a'\], expected unique"):
        config.section(_with(composed, "fetch.mirrors", [{**mirror, "name": "a"}] * 2), "fetch")
    with pytest.raises(ConfigError, match=r"'fetch.mirrors\[cvdf-gcs\].kind': got 'ftp'"):
        config.section(_with(composed, "fetch.mirrors", [{**mirror, "kind": "ftp"}]), "fetch")
    with pytest.raises(
        ConfigError, match=r"'model.filters': got \[8, 8, 8, 8\], expected at most 3"
    ):
        config.section(
            _with(compose(ROOT / "conf", ["model=cnn"]), "model.filters", [8] * 4), "model"
        )


def test_label_smoothing_and_onecycle_are_validated(composed):
    for value in (-0.1, 1.0):
        with pytest.raises(
            ConfigError,
            match=rf"^config 'train.label_smoothing': got {value}, "
            r"expected a number in \[0, 1\)$",
        ):
            config.section(_with(composed, "train.label_smoothing", value), "train")
    smoothed_mse = _with(
        _with(composed, "train.label_smoothing", 0.1), "train.loss", "mean_squared_error"
    )
    with pytest.raises(
        ConfigError,
        match=r"^config 'train.label_smoothing': got 0.1, expected "
        r"0 with train.loss mean_squared_error",
    ):
        config.section(smoothed_mse, "train")
    onecycle = _with(
        _with(composed, "train.lr_schedule.name", "onecycle"), "train.lr_schedule.warmup_epochs", 20
    )
    with pytest.raises(
        ConfigError,
        match=r"^config 'train.lr_schedule.warmup_epochs': got 20, "
        r"expected fewer than train.epochs \(20\)",
    ):
        config.section(onecycle, "train")
    assert (
        config.section(
            _with(onecycle, "train.lr_schedule.warmup_epochs", 2), "train"
        ).lr_schedule.name
        == "onecycle"
    )


def test_cnn_padding_and_dense_units_are_validated():
    cnn = compose(ROOT / "conf", ["model=cnn"])
    with pytest.raises(
        ConfigError,
        match=r"^config 'model.padding': got 'full', expected one "
        r"of 'same', 'valid'$",
    ):
        config.section(_with(cnn, "model.padding", "full"), "model")
    with pytest.raises(
        ConfigError,
        match=r"^config 'model.dense_units': got -1, expected an "
        r"integer >= 0$",
    ):
        config.section(_with(cnn, "model.dense_units", -1), "model")
    assert config.section(_with(cnn, "model.dense_units", 0), "model").dense_units == 0


def test_cnn_blocks_must_leave_an_image_to_pool():
    # valid padding, 2 convs of 3x3 per block: 28 -> 24 -> 12 -> 8 -> 4 -> 0 in the third block
    cnn = _with(
        _with(
            _with(compose(ROOT / "conf", ["model=cnn"]), "model.padding", "valid"),
            "model.convs_per_block",
            2,
        ),
        "model.kernel_size",
        3,
    )
    two = config.section(_with(cnn, "model.filters", [16, 32]), "model")
    assert two.filters == [16, 32]
    with pytest.raises(
        ConfigError,
        match=r"^config 'model.filters': got \[16, 32, 64\], "
        r"expected fewer blocks: with padding valid, 2 conv",
    ):
        config.section(_with(cnn, "model.filters", [16, 32, 64]), "model")


# The train section of the default config exactly as the dataclass schema flattened it: the
# MLflow params and config digest of a run with the same config must not change (they did
# when `augmentation.*` and `calibration.*` were added, and when
# `augmentation.photometric_share` was).
DEFAULT_TRAIN_PARAMS = {
    "batch_size": 128,
    "epochs": 20,
    "seed": 42,
    "loss": "categorical_crossentropy",
    "label_smoothing": 0.0,
    "shuffle": True,
    "augment": False,
    "augmentation.translate": 0.1,
    "augmentation.rotate": 0.05,
    "augmentation.zoom": 0.1,
    "augmentation.shear": 0.0,
    "augmentation.noise": 0.0,
    "augmentation.blur": 0.0,
    "augmentation.contrast": 0.0,
    "augmentation.erase": 0.0,
    "augmentation.photometric_share": 0.5,
    "early_stopping.enabled": False,
    "early_stopping.monitor": "val_loss",
    "early_stopping.patience": 5,
    "early_stopping.min_delta": 0.0,
    "early_stopping.restore_best_weights": True,
    "lr_schedule.name": "constant",
    "lr_schedule.warmup_epochs": 0,
    "lr_schedule.min_factor": 0.0,
    "lr_schedule.factor": 0.5,
    "lr_schedule.step_epochs": 10,
    "lr_schedule.patience": 3,
    "checkpoint.enabled": True,
    "checkpoint.every_epochs": 1,
    "checkpoint.resume": False,
    "calibration.temperature_scaling": True,
    "calibration.selective_accuracy": 0.999,
    "verbose": 2,
}


def test_flatten_gives_the_same_dotted_params(composed):
    flat = config.flatten(config.section(composed, "train"))
    assert json.dumps(flat) == json.dumps(DEFAULT_TRAIN_PARAMS)  # same keys, order and types
    assert config.flatten(config.section(composed, "runtime"))["jit_compile"] == "auto"


def test_values_keep_the_types_they_always_had():
    cfg = compose(
        ROOT / "conf",
        ["optimizer.learning_rate=1", "runtime.jit_compile=false", "tracking.experiment_name=123"],
    )
    assert repr(config.section(cfg, "optimizer").learning_rate) == "1.0"
    assert config.section(cfg, "runtime").jit_compile == "False"
    assert config.section(cfg, "tracking").experiment_name == "123"


def test_sections_are_frozen(composed):
    train = config.section(composed, "train")
    with pytest.raises(ValidationError):
        train.epochs = 3


def test_tracking_config_composes_conf_without_params_yaml(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    assert config.tracking_config(tmp_path) == config.section(compose(ROOT / "conf"), "tracking")
    helpers_config.write_params(tmp_path, tracking={"registered_model": "digits-v2"})
    assert config.tracking_config(tmp_path).registered_model == "digits-v2"
    with pytest.raises(ServerError, match="neither params.yaml nor conf/config.yaml"):
        config.tracking_config(tmp_path / "nowhere")


def test_test_helper_merges_only_what_a_test_changes():
    train = helpers_config.section("train", epochs=2, lr_schedule={"name": "cosine"})
    assert (train.epochs, train.lr_schedule.name, train.lr_schedule.factor) == (2, "cosine", 0.5)
    cnn = helpers_config.section("model", name="cnn", filters=[4])
    assert (cnn.filters, cnn.kernel_size) == ([4], 3)
    sweep = helpers_config.section("sweep", params={"train.batch_size": "choice(32, 64)"})
    assert sweep.params == {"train.batch_size": "choice(32, 64)"}  # replaced, not merged


def test_dvc_yaml_train_params_are_the_job_sections():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["params"] == list(config.JOB_SECTIONS)


def test_train_job_holds_each_section_it_reads(composed):
    job = config.TrainJob.from_config(composed)
    for name in (*config.JOB_SECTIONS, "paths"):
        assert getattr(job, name) == config.section(composed, name)
    assert set(config.RUN_SECTIONS) < set(config.JOB_SECTIONS)
    with pytest.raises(ConfigError, match="'optimizer.learning_rate': got -1"):
        config.TrainJob.from_config(_with(composed, "optimizer.learning_rate", -1))
