"""DVC stage `train`: train the configured Keras model and record the run in MLflow.

Under `dvc repro` / `dvc exp run` it reads the composed params.yaml (see dvc.yaml). By hand
it takes Hydra overrides (`python pipelines/train.py model=cnn optimizer=adam`) and
multirun (`-m`); multirun jobs only log to MLflow and never touch the DVC outputs.
"""

from mnist_pipeline import startup

startup.prepare()  # first: quiet logging, prompt exit

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mnist_pipeline import config  # noqa: E402
from mnist_pipeline.errors import ConfigError, reported  # noqa: E402
from mnist_pipeline.training import cluster  # noqa: E402  (no TensorFlow)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("train"):
        train_job = config.TrainJob.from_config(cfg)
        paths = train_job.paths
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if train_job.runtime.distribute == "multi_worker" and cluster.task() is None:
            if multirun:
                raise ConfigError(
                    "runtime.distribute",
                    "multi_worker",
                    "a single run (not -m), or TF_CONFIG set for each worker",
                )
            # This machine's workers, each this same command with its own TF_CONFIG.
            cluster.run_local(cluster.this_command(), train_job.runtime.workers)
            return
        startup.load_tensorflow()  # only once config is valid, before what imports it
        from mnist_pipeline.tracking import store
        from mnist_pipeline.training import job

        store.silence()
        outcome = job.train(
            train_job,
            checkpoint_dir=None if multirun else paths.checkpoints,
            run_name=f"multirun-{hydra_cfg.job.num}" if multirun else None,
            tags={"hydra.overrides": " ".join(hydra_cfg.overrides.task)},
        )
        if not outcome.runtime.chief:
            task = outcome.runtime.task
            print(f"train: worker {task.index} of {task.workers} done")
            return
        if not multirun:
            job.write_outputs(outcome, paths)
        m = outcome.metrics
        print(
            f"train: {train_job.model.name} {int(m['epochs_run'])} epochs, "
            f"val_accuracy {m.get('final_val_accuracy', float('nan')):.4f}, "
            f"{m.get('epoch_time_s_median', float('nan')):.2f} s/epoch "
            f"({outcome.runtime.precision}, {outcome.runtime.device}); "
            f"run {outcome.run_id}" + ("" if multirun else f"; wrote {paths.model}")
        )


if __name__ == "__main__":
    main()
