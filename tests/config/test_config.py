"""The config tree: params.yaml equals the composition of conf/, and validation is strict."""

from __future__ import annotations

import pytest
import yaml
from helpers.digits import ROOT

from mnist_pipeline import config
from mnist_pipeline.config.compose import compose
from mnist_pipeline.errors import ConfigError

SECTIONS = ["paths", "fetch", "preprocess", "model", "optimizer", "train", "runtime",
            "tracking", "evaluate", "gate"]


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


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"model={m}" for m in _group_options("model")]
                         + [f"optimizer={o}" for o in _group_options("optimizer")]
                         + [f"experiment={e}" for e in _group_options("experiment")])
def test_every_group_option_composes_and_validates(override):
    cfg = compose(ROOT / "conf", [override])
    for name in SECTIONS:
        config.section(cfg, name)


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


@pytest.mark.parametrize("dotted, value, expected", [
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
])
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


def test_flatten_gives_dotted_params():
    flat = config.flatten(config.section({"train": {}}, "train"))
    assert flat["batch_size"] == 128
    assert flat["early_stopping.patience"] == 5
