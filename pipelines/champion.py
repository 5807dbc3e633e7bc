"""DVC stage `champion`: record the registry's champion where DVC can see it.

Always runs (it is cheap: MLflow only, no TensorFlow). It writes `paths.champion`, a dependency
of evaluate, which changes only when the champion moved by anything but the last evaluate in
this workspace (see `tracking.champion_record`), so `dvc repro` reruns evaluate exactly then.
"""

import hydra
from omegaconf import DictConfig

from mnist_pipeline import config
from mnist_pipeline.errors import reported
from mnist_pipeline.files import write_json
from mnist_pipeline.tracking import champion_record, store


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("champion"):
        paths = config.section(cfg, "paths")
        tracking_cfg = config.section(cfg, "tracking")
        store.silence()
        decision = champion_record.decide(tracking_cfg, paths.gate)
        write_json(paths.champion, decision.record)
        print(decision.line(paths.champion))


if __name__ == "__main__":
    main()
