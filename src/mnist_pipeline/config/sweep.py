"""The schema of a Bayesian search (`conf/sweep/`): not part of params.yaml; `pipelines/sweep.py
+sweep=<space>` adds it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from .schema import _at_least, _one_of

SWEEP_METRICS = {"val_accuracy": "maximize", "val_loss": "minimize"}


@dataclass
class SweepSamplerConfig:
    # tpe: Bayesian optimisation (multivariate TPE, constant liar for parallel workers);
    # random: the baseline TPE has to beat.
    name: str = "tpe"
    # Each worker seeds its sampler from (seed, worker, trials already run), so parallel
    # workers and resumed studies do not draw the same points.
    seed: int = 0
    # Random trials before TPE models the space. Optuna's 10 suits long studies; for the
    # ~16-trial sweeps one machine affords, 5 leaves more trials to the model.
    n_startup_trials: int = 5

    def __post_init__(self) -> None:
        _one_of("sweep.sampler.name", self.name, ("tpe", "random"))
        _at_least("sweep.sampler.seed", self.seed, 0)
        _at_least("sweep.sampler.n_startup_trials", self.n_startup_trials, 0)


@dataclass
class SweepPrunerConfig:
    # median: stop a trial whose metric is worse than the median of earlier trials at the
    #   same epoch. successive_halving: at epochs min_resource * reduction_factor**k keep
    #   only the best 1/reduction_factor. threshold: stop a trial worse than `threshold`
    #   (a diverged run). none: every trial runs all its epochs.
    name: str = "median"
    # Complete trials before the median pruner prunes anything: a median of one or two
    # runs is noise.
    n_startup_trials: int = 4
    # Epochs every trial trains before it may be pruned: the first epochs rank runs poorly
    # (a high learning rate leads early, a well-tuned slower one overtakes it).
    n_warmup_steps: int = 2
    interval_steps: int = 1
    min_resource: int = 1
    reduction_factor: int = 3
    threshold: float | None = None

    def __post_init__(self) -> None:
        _one_of("sweep.pruner.name", self.name,
                ("median", "successive_halving", "threshold", "none"))
        for key in ("n_startup_trials", "n_warmup_steps"):
            _at_least(f"sweep.pruner.{key}", getattr(self, key), 0)
        for key in ("interval_steps", "min_resource"):
            _at_least(f"sweep.pruner.{key}", getattr(self, key), 1)
        _at_least("sweep.pruner.reduction_factor", self.reduction_factor, 2)
        if self.name == "threshold" and (self.threshold is None
                                         or not math.isfinite(self.threshold)):
            raise ConfigError("sweep.pruner.threshold", self.threshold,
                              "a finite number for pruner name=threshold")


@dataclass
class SweepConfig:
    """A Bayesian search: the space, its budget and where the study lives."""

    # The study's name in the storage and the experiment it writes:
    # conf/experiment/<name>.yaml (`dvc exp run -S experiment=<name>`).
    name: str = ""
    # Total trials of the study; a resumed study runs only the missing ones.
    n_trials: int = 20
    # Worker processes on this machine, each with cores // n_jobs TensorFlow threads.
    n_jobs: int = 1
    # Optuna storage URL; null: SQLite at <repository root>/sweeps/optuna.db. Point several
    # machines at one database (e.g. postgresql://...) to share a study.
    storage: str | None = None
    # A running trial records a heartbeat every heartbeat_s; one silent for grace_s (its
    # worker was killed) is failed and its place in the budget given to a new trial.
    heartbeat_s: int = 10
    grace_s: int = 60
    # A per-epoch validation metric (the test set is never used to choose).
    metric: str = "val_accuracy"
    direction: str = "maximize"
    sampler: SweepSamplerConfig = field(default_factory=SweepSamplerConfig)
    pruner: SweepPrunerConfig = field(default_factory=SweepPrunerConfig)
    # Search space: config key (or group) -> Hydra sweep syntax, e.g.
    # `optimizer.learning_rate: tag(log, interval(1e-4, 1e-1))`, `optimizer: choice(sgd, adam)`.
    params: dict[str, str] = field(default_factory=dict)
    # Hydra overrides applied to every trial before its sampled values (the epoch budget).
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise ConfigError("sweep.name", self.name,
                              "letters, digits, '.', '_' or '-' (it names a config file)")
        if not 1 <= self.n_trials <= 100000:
            raise ConfigError("sweep.n_trials", self.n_trials, "an integer in [1, 100000]")
        if not 1 <= self.n_jobs <= 256:
            raise ConfigError("sweep.n_jobs", self.n_jobs, "an integer in [1, 256]")
        if self.storage is not None and "://" not in self.storage:
            raise ConfigError("sweep.storage", self.storage,
                              "null or a database URL such as sqlite:///sweeps/optuna.db")
        _at_least("sweep.heartbeat_s", self.heartbeat_s, 1)
        if self.grace_s <= self.heartbeat_s:
            raise ConfigError("sweep.grace_s", self.grace_s,
                              f"an integer > sweep.heartbeat_s ({self.heartbeat_s})")
        _one_of("sweep.metric", self.metric, tuple(SWEEP_METRICS))
        if self.direction != SWEEP_METRICS[self.metric]:
            raise ConfigError("sweep.direction", self.direction,
                              f"{SWEEP_METRICS[self.metric]!r} for metric {self.metric!r}")
        if not self.params:
            raise ConfigError("sweep.params", self.params,
                              "a search space: config key -> Hydra sweep, e.g. "
                              "'optimizer.learning_rate: tag(log, interval(1e-4, 1e-1))'")
