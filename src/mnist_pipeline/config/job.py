"""The config of one training job: every section it reads, validated together.

The train stage, each sweep trial, the tests and the benchmarks build it the same way,
`TrainJob.from_config(composed)`, so the list of sections a training job reads is written
once, here; `dvc.yaml`'s train stage lists the same `params` (a test keeps them equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from .loading import section
from .schema import (
    ModelConfig,
    OptimizerConfig,
    PathsConfig,
    RuntimeConfig,
    TrackingConfig,
    TrainConfig,
)

# What a run computes: its params and config digest come from these sections...
RUN_SECTIONS = ("model", "optimizer", "train", "runtime")
# ...and every section a training job reads: those, plus where the run is recorded.
JOB_SECTIONS = (*RUN_SECTIONS, "tracking")


@dataclass(frozen=True)
class TrainJob:
    """One training job's validated config. `paths` come from the composed config too, but
    they are not params: dvc.yaml interpolates them into the stage's deps and outs."""

    model: ModelConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    runtime: RuntimeConfig
    tracking: TrackingConfig
    paths: PathsConfig

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DictConfig) -> TrainJob:
        """Validate the job's sections of a composed config: `paths`, then `JOB_SECTIONS`."""
        paths = section(cfg, "paths")
        return cls(paths=paths, **{name: section(cfg, name) for name in JOB_SECTIONS})
