"""One "machine" of the promotion race: in its own checkout, evaluate the candidate of each
round the moment the test says go (a file), and report the decision (another file).

    python race_worker.py <rounds>        (run in the checkout, MLFLOW_TRACKING_URI and
                                           MNIST_PIPELINE_LOCK_URL set)
"""

import shutil
import sys
import time
import traceback
from pathlib import Path

from mnist_pipeline import config, startup

startup.prepare()
startup.load_tensorflow()

from mnist_pipeline.evaluation import promotion  # noqa: E402
from mnist_pipeline.files import write_json  # noqa: E402

GO_TIMEOUT_S = 600


def main() -> None:
    rounds = int(sys.argv[1])
    import yaml

    params = yaml.safe_load(Path("params.yaml").read_text())
    paths = config.section(params, "paths")
    evaluate_cfg = config.section(params, "evaluate")
    gate_cfg = config.section(params, "gate")
    race = Path("race")
    Path(paths.model).parent.mkdir(parents=True, exist_ok=True)
    for index in range(rounds):
        deadline = time.monotonic() + GO_TIMEOUT_S
        while not (race / f"go-{index}").exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"round {index}: no go within {GO_TIMEOUT_S} s")
            time.sleep(0.01)
        shutil.copyfile(race / str(index) / "model.keras", paths.model)
        shutil.copyfile(race / str(index) / "run.json", paths.run)
        tracking = {**params["tracking"], "registered_model": f"race-{index}"}
        try:
            decision = promotion.evaluate(
                paths, evaluate_cfg, gate_cfg, config.section({"tracking": tracking}, "tracking")
            )
            outcome = {
                "version": decision.version,
                "passed": decision.verdict.passed,
                "line": decision.line,
            }
        except Exception:  # reported to the test, which fails on it
            outcome = {"error": traceback.format_exc()}
        write_json(race / f"done-{index}", outcome)


if __name__ == "__main__":
    main()
