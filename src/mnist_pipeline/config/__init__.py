"""Typed, validated configuration: the schema of each `params.yaml` section, how a composed
section is loaded into it, and how `conf/` composes into `params.yaml`."""

from .job import JOB_SECTIONS, RUN_SECTIONS, TrainJob  # noqa: F401
from .loading import (  # noqa: F401
    SECTION_SCHEMAS,
    build,
    flatten,
    section,
    to_dict,
    tracking_config,
)
from .schema import (  # noqa: F401
    AdamConfig,
    AugmentationConfig,
    CalibrationConfig,
    CheckpointConfig,
    CNNConfig,
    CorruptConfig,
    EarlyStoppingConfig,
    EvaluateConfig,
    FetchConfig,
    GateConfig,
    HttpMirror,
    LRScheduleConfig,
    MirrorConfig,
    MLPConfig,
    ModelConfig,
    MonitoringConfig,
    NpmMirror,
    OptimizerConfig,
    PathsConfig,
    PreprocessConfig,
    RMSpropConfig,
    RNNConfig,
    RuntimeConfig,
    SGDConfig,
    TrackingConfig,
    TrainConfig,
)
from .sweep import SweepConfig, SweepPrunerConfig, SweepSamplerConfig  # noqa: F401
