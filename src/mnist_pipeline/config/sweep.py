"""The schema of a Bayesian search (`conf/sweep/`): not part of params.yaml; `pipelines/sweep.py
+sweep=<space>` adds it.
"""

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from .schema import NAME_PATTERN, Expect, IntAtLeast0, IntAtLeast1, Section

# The per-epoch validation metrics a study can optimise (the test set is never used to
# choose), and the direction each is optimised in.
SWEEP_METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}

IntAtLeast2 = Annotated[int, Field(ge=2), Expect("an integer >= 2")]
Int1To256 = Annotated[int, Field(ge=1, le=256), Expect("an integer in [1, 256]")]
Int1To100000 = Annotated[int, Field(ge=1, le=100000), Expect("an integer in [1, 100000]")]


class SweepSamplerConfig(Section):
    # tpe: Bayesian optimisation (multivariate TPE, constant liar for parallel workers);
    # random: the baseline TPE has to beat.
    name: Literal["tpe", "random"]
    # Each worker seeds its sampler from (seed, worker, trials already run), so parallel
    # workers and resumed studies do not draw the same points.
    seed: IntAtLeast0
    # Random trials before TPE models the space. Optuna's 10 suits long studies; for the
    # ~16-trial sweeps one machine affords, fewer leaves more trials to the model.
    n_startup_trials: IntAtLeast0


class SweepPrunerConfig(Section):
    # median: stop a trial whose metric is worse than the median of earlier trials at the
    #   same epoch. successive_halving: at epochs min_resource * reduction_factor**k keep
    #   only the best 1/reduction_factor. threshold: stop a trial worse than `threshold`
    #   (a diverged run). none: every trial runs all its epochs.
    name: Literal["median", "successive_halving", "threshold", "none"]
    # Complete trials before the median pruner prunes anything: a median of one or two
    # runs is noise.
    n_startup_trials: IntAtLeast0
    # Epochs every trial trains before it may be pruned: the first epochs rank runs poorly
    # (a high learning rate leads early, a well-tuned slower one overtakes it).
    n_warmup_steps: IntAtLeast0
    interval_steps: IntAtLeast1
    min_resource: IntAtLeast1
    reduction_factor: IntAtLeast2
    threshold: float | None

    @model_validator(mode="after")
    def _threshold_for_threshold_pruner(self) -> "SweepPrunerConfig":
        if self.name == "threshold" and (
            self.threshold is None or not math.isfinite(self.threshold)
        ):
            raise ConfigError(
                "sweep.pruner.threshold",
                self.threshold,
                "a finite number for pruner name=threshold",
            )
        return self


class SweepConfig(Section):
    """A Bayesian search: the space, its budget and where the study lives."""

    # The study's name in the storage and the experiment it writes:
    # conf/experiment/<name>.yaml (`dvc exp run -S experiment=<name>`).
    name: Annotated[
        str,
        Field(pattern=NAME_PATTERN),
        Expect("letters, digits, '.', '_' or '-' (it names a config file)"),
    ]
    # Total trials of the study; a resumed study runs only the missing ones.
    n_trials: Int1To100000
    # Worker processes on this machine, each with cores // n_jobs TensorFlow threads.
    n_jobs: Int1To256
    # Optuna storage URL; null: SQLite at <repository root>/sweeps/optuna.db. Point several
    # machines at one database (e.g. postgresql://...) to share a study.
    storage: str | None
    # A running trial records a heartbeat every heartbeat_s; one silent for grace_s (its
    # worker was killed) is failed and its place in the budget given to a new trial.
    heartbeat_s: IntAtLeast1
    grace_s: int
    metric: Literal[tuple(SWEEP_METRICS)]  # type: ignore[valid-type]
    direction: Literal["maximize", "minimize"]
    sampler: SweepSamplerConfig
    pruner: SweepPrunerConfig
    # Search space: config key (or group) -> Hydra sweep syntax, e.g.
    # `optimizer.learning_rate: tag(log, interval(1e-4, 1e-1))`, `optimizer: choice(sgd, adam)`.
    params: Annotated[
        dict[str, str],
        Field(min_length=1),
        Expect(
            "a search space: config key -> Hydra sweep, e.g. "
            "'optimizer.learning_rate: tag(log, interval(1e-4, 1e-1))'"
        ),
    ]
    # Hydra overrides applied to every trial before its sampled values (the epoch budget).
    overrides: list[str]

    @field_validator("storage")
    @classmethod
    def _database_url(cls, storage: str | None) -> str | None:
        if storage is not None and "://" not in storage:
            raise ConfigError(
                "sweep.storage",
                storage,
                "null or a database URL such as sqlite:///sweeps/optuna.db",
            )
        return storage

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        if self.grace_s <= self.heartbeat_s:
            raise ConfigError(
                "sweep.grace_s",
                self.grace_s,
                f"an integer > sweep.heartbeat_s ({self.heartbeat_s})",
            )
        if self.direction != SWEEP_METRICS[self.metric]:
            raise ConfigError(
                "sweep.direction",
                self.direction,
                f"{SWEEP_METRICS[self.metric]!r} for metric {self.metric!r}",
            )
        return self
