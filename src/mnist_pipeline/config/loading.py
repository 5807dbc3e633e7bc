"""Turning a composed config section into its validated schema object, and back to plain data."""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .. import project
from ..errors import ConfigError, ServerError
from .schema import (
    EXPECTED,
    TYPE_ERRORS,
    CorruptConfig,
    EvaluateConfig,
    Expect,
    FetchConfig,
    GateConfig,
    ModelConfig,
    MonitoringConfig,
    OptimizerConfig,
    PathsConfig,
    PreprocessConfig,
    RuntimeConfig,
    TrackingConfig,
    TrainConfig,
)
from .sweep import SweepConfig

# --- loading -------------------------------------------------------------------------------

SECTION_SCHEMAS: dict[str, Any] = {
    "paths": PathsConfig,
    "fetch": FetchConfig,
    "preprocess": PreprocessConfig,
    "corrupt": CorruptConfig,
    "model": ModelConfig,  # one of MLPConfig, CNNConfig, RNNConfig, by `name`
    "optimizer": OptimizerConfig,  # one of SGDConfig, RMSpropConfig, AdamConfig, by `name`
    "train": TrainConfig,
    "runtime": RuntimeConfig,
    "tracking": TrackingConfig,
    "evaluate": EvaluateConfig,
    "gate": GateConfig,
    "monitoring": MonitoringConfig,
    "sweep": SweepConfig,  # not in params.yaml: `pipelines/sweep.py +sweep=<space>` adds it
}


def section(cfg: Mapping[str, Any] | DictConfig, name: str) -> Any:
    """Validate section `name` of a composed config and return it as its schema model."""
    if name not in SECTION_SCHEMAS:
        raise ConfigError(name, None, "one of the sections " + ", ".join(SECTION_SCHEMAS))
    if name not in cfg:
        raise ConfigError(name, None, f"a '{name}' section in the composed config")
    raw = cfg[name]
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, "a mapping")
    return build(SECTION_SCHEMAS[name], raw, prefix=name)


def build(schema: Any, raw: Mapping[str, Any], prefix: str) -> Any:
    """Validate `raw` against `schema`; the first failure is a `ConfigError` under `prefix`."""
    try:
        return TypeAdapter(schema).validate_python(raw)
    except ValidationError as err:
        raise config_error(err, schema, raw, prefix) from None


def config_error(err: ValidationError, schema: Any, raw: Any, prefix: str) -> ConfigError:
    """The first failure of `err` as the one line a user sees: key, value, what is allowed."""
    first = err.errors()[0]
    kind, loc, ctx = first["type"], first["loc"], first.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):  # a cross-field rule names its own key
        return ctx["error"]
    key, annotation, field = _locate(schema, raw, loc, prefix)
    value = first.get("input")
    if kind == EXPECTED:
        allowed = ctx[EXPECTED]
    elif kind in TYPE_ERRORS:
        allowed = f"a value of type {TYPE_ERRORS[kind]}"
    elif kind == "extra_forbidden":
        parent = _locate(schema, raw, loc[:-1], prefix)[1]
        allowed = "one of the known keys: " + ", ".join(parent.model_fields)
    elif kind == "literal_error":
        allowed = "one of " + ", ".join(map(repr, get_args(_strip(annotation)[0])))
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        members, tag = _strip(annotation)
        assert tag is not None, "a tagged union's error comes with its discriminator"
        key, value = f"{key}.{tag}", value.get(tag) if isinstance(value, Mapping) else None
        allowed = "one of " + ", ".join(map(repr, _variants(members, tag)))
    elif kind == "missing":
        expect = [m.text for m in (field.metadata if field else []) if isinstance(m, Expect)]
        value, allowed = None, f"{(expect or ['a value'])[0]} (the key is missing)"
    else:
        allowed = first["msg"]
    return ConfigError(key, value, allowed)


def _locate(
    schema: Any, raw: Any, loc: tuple[int | str, ...], prefix: str
) -> tuple[str, Any, FieldInfo | None]:
    """The dotted key of pydantic's error location `loc`, its annotation and its field.

    pydantic names the chosen member of a tagged union (`model` -> `mlp`) in the location;
    users never wrote it, so the key leaves it out. A list item is named by its `name` key
    when it has one: `fetch.mirrors[cvdf-gcs].url`.
    """
    key, annotation, field, node = prefix, schema, None, raw
    for part in loc:
        members, tag = _strip(annotation)
        if tag and part in _variants(members, tag):
            annotation = _variants(members, tag)[part]
            continue
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and part < len(node) else None
            name = item.get("name") if isinstance(item, Mapping) else None
            key += f"[{part if name is None else name}]"
            annotation, node = (get_args(members) or [Any])[0], item
            continue
        key += f".{part}"
        node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(members, type) and issubclass(members, BaseModel):
            field = members.model_fields.get(part)
            annotation = field.annotation if field else Any
        else:  # a free-form mapping: its values' annotation
            annotation = (get_args(members) or [Any, Any])[-1]
    return key, annotation, field


def _strip(annotation: Any) -> tuple[Any, str | None]:
    """`Annotated[X, ...]` -> X, and the discriminator of a tagged union (else None)."""
    tag = None
    while get_origin(annotation) is Annotated:
        annotation, *metadata = get_args(annotation)
        tags = [m.discriminator for m in metadata if isinstance(m, FieldInfo)]
        tag = next((t for t in tags if isinstance(t, str) and t), tag)
    return annotation, tag


def _variants(union: Any, tag: str) -> dict[Any, type[BaseModel]]:
    """A tagged union's members by their tag value: {'mlp': MLPConfig, ...}."""
    if get_origin(union) not in (Union, types.UnionType):
        return {}
    return {get_args(m.model_fields[tag].annotation)[0]: m for m in get_args(union)}


def to_dict(obj: Any) -> Any:
    """A validated section as plain, YAML/JSON-ready data, in field order."""
    if isinstance(obj, BaseModel):
        return {name: to_dict(getattr(obj, name)) for name in type(obj).model_fields}
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


PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"


def tracking_config(root: str | os.PathLike[str] | None = None) -> TrackingConfig:
    """The `tracking` section of `<repo root>/params.yaml`, else of what `conf/` composes to.

    The servers and `mnist-predict` run outside DVC, so they read the composed params.yaml
    the stages read; a checkout that has not composed it yet composes `conf/` instead.
    """
    return checkout_section("tracking", root)


def checkout_section(name: str, root: str | os.PathLike[str] | None = None) -> Any:
    """Section `name` of `<repo root>/params.yaml`, else of what `conf/` composes to: what
    commands that run outside DVC read (see `tracking_config`)."""
    path = Path(root) if root is not None else project.root()
    params = path / PARAMS_FILE
    if params.is_file():
        try:
            raw = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ServerError(
                f"{params}: not valid YAML ({err}); recompose it: make params"
            ) from None
    elif (path / CONF_DIR / "config.yaml").is_file():
        from .compose import compose

        raw = compose(path / CONF_DIR)
    else:
        raise ServerError(
            f"{path}: neither {PARAMS_FILE} nor {CONF_DIR}/config.yaml; run from "
            "the project's root or set DVC_ROOT to it"
        )
    if not isinstance(raw, Mapping) or name not in raw:
        raise ServerError(f"{params}: no '{name}' section; recompose it: make params")
    return section(raw, name)
