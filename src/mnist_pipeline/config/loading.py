"""Turning a composed config section into its validated schema object, and back to plain data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .. import project
from ..errors import ConfigError, ServerError
from .schema import (
    MODEL_SCHEMAS,
    OPTIMIZER_SCHEMAS,
    EvaluateConfig,
    FetchConfig,
    GateConfig,
    PathsConfig,
    PreprocessConfig,
    RuntimeConfig,
    TrackingConfig,
    TrainConfig,
)
from .sweep import SweepConfig

T = TypeVar("T")


# --- loading -------------------------------------------------------------------------------

SECTION_SCHEMAS: dict[str, type] = {
    "paths": PathsConfig,
    "fetch": FetchConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "runtime": RuntimeConfig,
    "tracking": TrackingConfig,
    "evaluate": EvaluateConfig,
    "gate": GateConfig,
    "sweep": SweepConfig,  # not in params.yaml: `pipelines/sweep.py +sweep=<space>` adds it
}
VARIANT_SCHEMAS: dict[str, dict[str, type]] = {"model": MODEL_SCHEMAS,
                                               "optimizer": OPTIMIZER_SCHEMAS}


def section(cfg: Mapping[str, Any] | DictConfig, name: str) -> Any:
    """Validate section `name` of a composed config and return it as its dataclass."""
    if name not in cfg:
        raise ConfigError(name, None, f"a '{name}' section in the composed config")
    raw = cfg[name]
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, "a mapping")
    if name in VARIANT_SCHEMAS:
        choices = VARIANT_SCHEMAS[name]
        variant = raw.get("name")
        if variant not in choices:
            raise ConfigError(f"{name}.name", variant, "one of " + ", ".join(map(repr, choices)))
        schema = choices[variant]
    elif name in SECTION_SCHEMAS:
        schema = SECTION_SCHEMAS[name]
    else:
        raise ConfigError(name, None, "one of the sections " + ", ".join(
            list(SECTION_SCHEMAS) + list(VARIANT_SCHEMAS)))
    return build(schema, raw, prefix=name)


def build(schema: type[T], raw: Mapping[str, Any], prefix: str) -> T:
    """Merge `raw` onto `schema`'s defaults and instantiate it, naming the key on failure."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as err:
        key = f"{prefix}.{err.full_key}"
        allowed = _field_names(schema, str(err.full_key))
        raise ConfigError(key, _lookup(raw, str(err.full_key)),
                          f"one of the known keys: {allowed}") from None
    except ValidationError as err:
        key = f"{prefix}.{err.full_key}"
        raise ConfigError(key, _lookup(raw, str(err.full_key)),
                          _expected_type(err.msg)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(prefix, raw, f"a valid '{prefix}' section ({err.msg})") from None


def to_dict(obj: Any) -> Any:
    """A validated dataclass as plain, YAML/JSON-ready data."""
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists keep their index (`a.0`)."""
    data = to_dict(obj)
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{index}."))
    else:
        out[prefix[:-1]] = data
    return out


def _lookup(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.strip("[]").isdigit():
            node = node[int(part.strip("[]"))]
        else:
            return None
    return node


def _field_names(schema: type, dotted: str) -> str:
    """Names of the fields at the level where an unknown key `dotted` was found."""
    current: Any = schema
    for part in dotted.split(".")[:-1]:
        nested = {f.name: f for f in fields(current)}.get(part) if is_dataclass(current) else None
        if nested is None:
            break
        default = nested.default_factory() if callable(nested.default_factory) else None  # type: ignore[misc]
        if not is_dataclass(default):
            break
        current = type(default)
    return ", ".join(f.name for f in fields(current)) if is_dataclass(current) else "?"


def _expected_type(msg: str) -> str:
    match = re.search(r"could not be converted to (\w+)", msg)
    if match:
        return f"a value of type {match.group(1).lower()}"
    return msg.splitlines()[0]


PARAMS_FILE = "params.yaml"


def tracking_config(root: str | os.PathLike[str] | None = None) -> TrackingConfig:
    """The `tracking` section of `<repo root>/params.yaml` (defaults when there is none).

    The servers and `mnist-predict` run outside DVC, so they read the composed params.yaml
    the stages read, not `conf/`.
    """
    path = Path(root) if root is not None else project.root()
    params = path / PARAMS_FILE
    if not params.is_file():
        return TrackingConfig()
    try:
        raw = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ServerError(f"{params}: not valid YAML ({err}); recompose it: make params") from None
    if "tracking" not in raw:
        return TrackingConfig()
    return section(raw, "tracking")
