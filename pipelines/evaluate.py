"""DVC stage `evaluate`: score the model on the official test set and the corrupted suite,
and gate its promotion.

Registers the model as a new version of `tracking.registered_model`; only a candidate that
passes every gate rule moves the `champion` alias. A rejection is a normal outcome (the
stage succeeds and records it in gate.json) unless `gate.fail_on_reject` is set.
"""

from mnist_pipeline import startup

startup.prepare()  # first: quiet logging, prompt exit

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mnist_pipeline import config  # noqa: E402
from mnist_pipeline.errors import PipelineError, reported  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("evaluate"):
        paths = config.section(cfg, "paths")
        eval_cfg, gate_cfg, tracking_cfg = (
            config.section(cfg, name) for name in ("evaluate", "gate", "tracking")
        )
        startup.load_tensorflow()  # only once config is valid, before what imports it
        from mnist_pipeline.evaluation import promotion
        from mnist_pipeline.tracking import store

        store.silence()
        decision = promotion.evaluate(paths, eval_cfg, gate_cfg, tracking_cfg)
        s, shift = decision.scores, decision.shift
        worst, worst_accuracy = shift.worst
        print(
            f"evaluate: test accuracy {s.accuracy:.4f}, loss {s.loss:.4f}, "
            f"macro F1 {s.macro_f1:.4f}; corrupted mean {shift.mean_accuracy:.4f} (worst "
            f"{worst} {worst_accuracy:.4f}, {decision.shift_seconds:.1f} s); ECE "
            f"{shift.clean.ece:.4f} calibrated, {shift.clean.ece_raw:.4f} raw "
            f"(wrote {paths.eval_metrics}, {paths.gate})"
        )
        print(decision.line)
        if gate_cfg.fail_on_reject and not decision.verdict.passed:
            raise PipelineError("candidate rejected and gate.fail_on_reject is set")


if __name__ == "__main__":
    main()
