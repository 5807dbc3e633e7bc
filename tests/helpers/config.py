"""Config for tests: what `conf/` composes to, with only the keys a test changes.

The schema holds no values, so a section is always built from the composed `conf/`:
`section("train", epochs=2, checkpoint={"enabled": False})` is the default train section
with two keys changed. Nested sections merge key by key; anything else (a list, a sweep's
`params`, `fetch.files`) is replaced whole. A changed `name` of `model` or `optimizer`
starts from that option of the group (`section("model", name="cnn")` is conf/model/cnn.yaml);
a `sweep` section starts from conf/sweep/mlp.yaml.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from helpers.digits import ROOT
from mnist_pipeline import config
from mnist_pipeline.config.compose import compose

GROUPS = ("model", "optimizer")  # sections chosen by `name` from conf/<group>/<name>.yaml
SWEEP = "mlp"


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    return compose(ROOT / "conf", list(overrides))


def composed(*overrides: str) -> dict[str, Any]:
    """What conf/ composes to with Hydra `overrides` (a copy the caller may change)."""
    return copy.deepcopy(_composed(overrides))


def values(name: str, /, **changes: Any) -> dict[str, Any]:
    """Section `name` of the composed config as plain data, with `changes` merged in."""
    if name in GROUPS and "name" in changes:
        base = composed(f"{name}={changes['name']}")[name]
    elif name == "sweep":
        base = composed(f"+sweep={SWEEP}")[name]
    else:
        base = composed()[name]
    return merge(base, changes, config.SECTION_SCHEMAS[name])


def section(name: str, /, **changes: Any) -> Any:
    """Section `name` validated, e.g. `section("optimizer", name="adam", learning_rate=0.1)`."""
    return config.section({name: values(name, **changes)}, name)


def params(**changes: Mapping[str, Any]) -> dict[str, Any]:
    """A whole composed config (params.yaml) with per-section changes:
    `params(tracking={"registered_model": "digits-v2"})`."""
    return {name: values(name, **changes.get(name, {})) for name in composed()}


def write_params(root: Path, **changes: Mapping[str, Any]) -> Path:
    """`root/params.yaml` as a checkout has it (see `params`), for code that runs outside
    DVC and reads it: the servers, `mnist-predict`."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params(**changes), sort_keys=False), encoding="utf-8")
    return path


def train_job(**changes: Mapping[str, Any]) -> config.TrainJob:
    """A training job's config with per-section changes:
    `train_job(model={"hidden_units": [8]}, paths={"processed": str(folder)})`."""
    return config.TrainJob.from_config(params(**changes))


def merge(base: Mapping[str, Any], changes: Mapping[str, Any], schema: Any) -> dict[str, Any]:
    """`base` with `changes`: a nested section of `schema` merges, any other value replaces."""
    out = copy.deepcopy(dict(base))
    fields = schema.model_fields if _is_section(schema) else {}
    for key, value in changes.items():
        nested = fields[key].annotation if key in fields else None
        if _is_section(nested) and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value, nested)
        else:
            out[key] = value
    return out


def _is_section(schema: Any) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def float32_models():
    """A fixture body: Keras' global dtype policy at float32 while a test builds models (an
    earlier test in the same process may have left mixed_bfloat16, as training does)."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
