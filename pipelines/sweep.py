"""Bayesian search over a space in conf/sweep/ (not a DVC stage): one MLflow parent run,
one nested run per trial, the best trial written as conf/experiment/<sweep.name>.yaml.

    python pipelines/sweep.py +sweep=mlp [sweep.n_trials=16] [sweep.n_jobs=2] [overrides...]

Any override that is not `sweep.*` applies to every trial and fixes that key if it is in
the space. Nothing DVC tracks is written and no model is registered: train the result with
`dvc exp run -S experiment=<sweep.name>`. Rerun the same command to continue an interrupted
study (`sweep.n_trials` is its total); run it on several machines with one shared
`sweep.storage` database (and MLFLOW_TRACKING_URI) to split the trials between them.
"""

import argparse
import sys
from pathlib import Path

from mnist_pipeline import startup

startup.prepare()  # first: quiet logging (the workers inherit it), prompt exit

from mnist_pipeline.errors import reported  # noqa: E402
from mnist_pipeline.sweep import coordinator  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides; +sweep=<space> picks the space (conf/sweep/<space>.yaml)",
    )
    parser.add_argument("--conf", default=str(CONF), help="the Hydra config folder")
    args = parser.parse_args()
    with reported("sweep"):
        try:
            summary = coordinator.run(args.conf, args.overrides)
        except KeyboardInterrupt:
            print(
                "sweep: interrupted; rerun the same command to continue the study", file=sys.stderr
            )
            raise SystemExit(130) from None
    print(summary.line)


if __name__ == "__main__":
    main()
