"""The search space: `conf/sweep/<space>.yaml`, in Hydra's override syntax, as Optuna
distributions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ..errors import ConfigError

# The parts of a config a sweep may search and an experiment file sets: what is trained.
SEARCHED_SECTIONS = ("model", "optimizer", "train")


# --- search space --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One searched key: its Optuna distribution and how a sampled value becomes an override."""

    key: str
    spec: str
    distribution: BaseDistribution
    # For a categorical: each choice as override text (`[512,256]`), by index.
    texts: tuple[str, ...] = ()

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            # A categorical's internal representation is the choice's index.
            index = int(self.distribution.to_internal_repr(value))
            return f"{self.key}={self.texts[index]}"
        return f"{self.key}={value!r}"

    def suggest(self, trial: optuna.Trial) -> str:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(self.key, d.choices)
        elif isinstance(d, IntDistribution):
            value = trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        else:
            assert isinstance(d, FloatDistribution)
            value = trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)
        return self.override(value)

    def probe(self) -> str:
        """An override with one valid value (the first choice, the low end)."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return self.override(d.choices[0])
        assert isinstance(d, (IntDistribution, FloatDistribution))
        return self.override(d.low)


def parse_space(space: Mapping[str, str]) -> list[Dimension]:
    """`sweep.params` (key -> Hydra sweep syntax) as Optuna distributions.

    `choice(a, b)` -> categorical (lists and dicts are choices too); `range(a, b[, step])`
    -> int (or stepped float) from a up to but excluding b, like Hydra and Python;
    `interval(a, b)` -> float; `tag(log, ...)` samples on a log scale.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import (
        ChoiceSweep,
        IntervalSweep,
        OverrideType,
        RangeSweep,
        Transformer,
    )
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    dimensions = []
    for key, spec in space.items():
        name = f"sweep.params.{key}"
        try:
            override = parser.parse_override(f"{key}={spec}")
        except HydraException as err:
            raise ConfigError(
                name, spec, f"Hydra sweep syntax ({str(err).splitlines()[0]})"
            ) from None
        _check_searched_key(name, override.key_or_group)
        if override.type != OverrideType.CHANGE or override.package is not None:
            raise ConfigError(name, key, "a plain key: no '+', '++', '~' or '@package'")
        value = override.value()
        if not override.is_sweep_override():
            raise ConfigError(
                name,
                spec,
                "a sweep: choice(...), range(...) or interval(...); "
                "fixed values belong in sweep.overrides",
            )
        tags = set(getattr(value, "tags", set()))
        if tags - {"log"}:
            raise ConfigError(name, spec, "no tag other than 'log'")
        log = "log" in tags
        try:
            if override.is_choice_sweep():
                if not isinstance(value, ChoiceSweep) or value.shuffle or log:
                    raise ConfigError(name, spec, "choice(a, b, ...) without shuffle or log")
                # encode: a number, bool or string as itself, anything else as its text.
                choices = cast(
                    "list[CategoricalChoiceType]",
                    list(override.sweep_iterator(transformer=Transformer.encode)),
                )
                texts = cast(
                    "tuple[str, ...]", tuple(override.sweep_iterator(transformer=Transformer.str))
                )
                if len(set(map(repr, choices))) != len(choices):
                    raise ConfigError(name, spec, "distinct choices")
                dimensions.append(Dimension(key, spec, CategoricalDistribution(choices), texts))
            elif override.is_range_sweep():
                assert isinstance(value, RangeSweep)
                if value.shuffle or not value.step or value.step < 0:
                    raise ConfigError(name, spec, "range(start, stop, step) with a step > 0")
                values = list(value.range())
                if not values:
                    raise ConfigError(name, spec, "a range holding at least one value")
                if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
                    distribution: BaseDistribution = IntDistribution(
                        values[0], values[-1], step=int(value.step), log=log
                    )
                else:
                    distribution = FloatDistribution(
                        float(values[0]), float(values[-1]), step=float(value.step), log=log
                    )
                dimensions.append(Dimension(key, spec, distribution))
            elif override.is_interval_sweep():
                assert isinstance(value, IntervalSweep)
                assert value.start is not None and value.end is not None  # interval(a, b)
                dimensions.append(
                    Dimension(
                        key, spec, FloatDistribution(float(value.start), float(value.end), log=log)
                    )
                )
            else:
                raise ConfigError(name, spec, "choice(...), range(...) or interval(...)")
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(name, spec, f"a valid distribution ({err})") from None
    return dimensions


def _check_searched_key(name: str, key: str) -> None:
    if key.split(".")[0] not in SEARCHED_SECTIONS:
        raise ConfigError(
            name,
            key,
            "a key or group of "
            + ", ".join(SEARCHED_SECTIONS)
            + " (what a trial trains; data, paths and runtime are not searched)",
        )


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides -> (those that configure the sweep, those for every trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for_sweep, for_trials = [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:
            raise ConfigError("overrides", text, f"a Hydra override ({err})") from None
        key = override.key_or_group
        if key == "sweep" or key.startswith("sweep."):
            for_sweep.append(text)
        elif override.is_sweep_override():
            raise ConfigError(
                "overrides",
                text,
                "a fixed value; searched keys belong in the space (sweep.params in conf/sweep/)",
            )
        else:
            for_trials.append(text)
    return for_sweep, for_trials


def fixed_keys(overrides: Sequence[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}
