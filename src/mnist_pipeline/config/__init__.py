"""Typed, validated configuration: the schema of each `params.yaml` section, how a composed
section is loaded into it, and how `conf/` composes into `params.yaml`."""

from .loading import (  # noqa: F401
                      SECTION_SCHEMAS,
                      VARIANT_SCHEMAS,
                      build,
                      flatten,
                      section,
                      to_dict,
                      tracking_config,
)
from .schema import *  # noqa: F403
from .sweep import SweepConfig, SweepPrunerConfig, SweepSamplerConfig  # noqa: F401

