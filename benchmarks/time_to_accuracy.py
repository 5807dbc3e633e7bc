"""Time to accuracy: how soon after its process starts each recipe reaches 98%, 99% and 99.5%
official test accuracy, against Keras' own MNIST convnet example (the peer).

    python benchmarks/time_to_accuracy.py                               # every recipe
    python benchmarks/time_to_accuracy.py --recipes peer fast --max-epochs 4   # a quick look
    python benchmarks/time_to_accuracy.py --synthetic --max-epochs 1    # plumbing only

Each recipe runs in its own process, one after the other, so its peak RSS (`os.wait4`) and its
time from process start are its own:

- `peer`: benchmarks/keras_convnet.py, the example as published (float32, Adam, batch 128,
  15 epochs, `validation_split=0.1`, inputs /255), run as a script; a bootstrap replaces
  `keras.datasets.mnist.load_data` with a reader of an mnist.npz built from data/raw (the
  same images as the pipeline's) and adds the benchmark's callback to `fit`;
- `mlp`: the pipeline's default config (the tutorial MLP), trained by the train stage's own
  `fit` on data/processed (55,000 training, 5,000 validation images);
- every other name: `conf/experiment/<name>.yaml`, trained the same way.

The benchmark's callback scores the official 10,000 test images after each epoch (the
pipeline recipes through the float32 copy of the model they would save), and only the
benchmark reads that score: no recipe uses it for any choice. Its own time is subtracted from
the clock. Recipes train without MLflow (the stage's tracking adds a few seconds per run, not
per epoch). `--max-epochs` stops a recipe after that many epochs without changing its
schedule, so the times it reports are those of the full recipe. Numbers are printed, never
asserted; the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    add_recipes,
    check_recipes,
    child_env,
    cpu_model,
    raw_arrays,
    run_measured,
    steady_epoch_time,
    synthetic_arrays,
    table,
)

PEER = ROOT / "benchmarks" / "keras_convnet.py"
THRESHOLDS = (0.98, 0.99, 0.995)
DEFAULT_RECIPES = ("peer", "mlp", "mlp-tuned", "cnn", "quick", "fast", "best")


# --- arguments -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipes(parser, DEFAULT_RECIPES, ("peer", "mlp"))
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="stop each recipe after this many epochs (0: its own count)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="learnable synthetic digits instead of data/ (plumbing tests)",
    )
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--processed", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed to each recipe's process (default 1800)",
    )
    parser.add_argument("--peer-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--recipe-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_child or args.recipe_child:
        return args
    if args.max_epochs < 0:
        parser.error(f"--max-epochs: got {args.max_epochs}, expected an integer >= 0")
    check_recipes(parser, args.recipes, ("peer", "mlp"))
    return args


# --- arithmetic (pure; tested) --------------------------------------------------------------


def time_to(threshold: float, times: Sequence[float], accuracies: Sequence[float]) -> float:
    """Seconds at the end of the first epoch whose accuracy reaches `threshold`; NaN if none."""
    for seconds, accuracy in zip(times, accuracies, strict=True):
        if accuracy >= threshold:
            return seconds
    return float("nan")


def row(name: str, record: dict[str, Any]) -> list[str]:
    def seconds(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.1f}"

    accuracies = record["test_accuracy"]
    reached = [seconds(time_to(t, record["since_start_s"], accuracies)) for t in THRESHOLDS]
    return [
        name,
        f"{steady_epoch_time(record['epoch_time_s']):.2f}",
        *reached,
        f"{accuracies[-1]:.4f}" if accuracies else "-",
        str(len(accuracies)),
        f"{record['peak_rss_mb']:,.0f}",
        f"{record['wall_s']:.1f}",
    ]


HEADER = [
    "recipe",
    "s/epoch",
    "t 98%",
    "t 99%",
    "t 99.5%",
    "final acc",
    "epochs",
    "peak MB",
    "wall s",
]


# --- children: one recipe each -------------------------------------------------------------


class Clock:
    """Seconds since the process started, less the time the benchmark spent scoring."""

    def __init__(self, started: float) -> None:
        self.started, self.scoring = started, 0.0

    def now(self) -> float:
        return time.time() - self.started - self.scoring


def scorer(
    clock: Clock,
    record: dict[str, Any],
    test_x: Any,
    test_y: Any,
    max_epochs: int,
    float32_copy: Any = None,
) -> Any:
    """A Keras callback: times each epoch, scores the test set after it, stops at the cap."""
    import keras
    import numpy as np

    class Score(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.begun = clock.now()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            ended = clock.now()
            record["epoch_time_s"].append(ended - self.begun)
            record["since_start_s"].append(ended)
            scoring = time.time()
            model = float32_copy(self.model) if float32_copy else self.model
            probabilities = model.predict(test_x, batch_size=1000, verbose=0)
            record["test_accuracy"].append(float(np.mean(probabilities.argmax(-1) == test_y)))
            clock.scoring += time.time() - scoring
            if max_epochs and epoch + 1 >= max_epochs:
                self.model.stop_training = True

    return Score()


def new_record() -> dict[str, Any]:
    return {"epoch_time_s": [], "since_start_s": [], "test_accuracy": []}


def peer_child(npz: Path, report: Path, started: float, max_epochs: int) -> None:
    """Run the example script with local data and the benchmark's callback (child mode)."""
    clock = Clock(started)
    import runpy

    import keras
    import numpy as np

    record = new_record()
    with np.load(npz, allow_pickle=False) as f:
        arrays = {key: f[key] for key in f.files}
    test_x = np.expand_dims(arrays["x_test"].astype("float32") / 255, -1)  # as the script does

    def load_data(path: str = "mnist.npz") -> tuple:
        return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])

    original_fit = keras.Model.fit

    def fit(self: keras.Model, *args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [
            *(kwargs.get("callbacks") or []),
            scorer(clock, record, test_x, arrays["y_test"], max_epochs),
        ]
        return original_fit(self, *args, **kwargs)

    keras.datasets.mnist.load_data = load_data
    keras.Model.fit = fit
    sys.argv = [str(PEER)]
    runpy.run_path(str(PEER), run_name="__main__")
    record["precision"] = "float32"
    report.write_text(json.dumps(record))


def recipe_child(name: str, processed: Path, report: Path, started: float, max_epochs: int) -> None:
    """Train one pipeline recipe with the stage's `fit` (child mode)."""
    clock = Clock(started)
    from mnist_pipeline import startup

    startup.prepare()
    startup.load_tensorflow()
    from mnist_pipeline.config import TrainJob
    from mnist_pipeline.config.compose import compose
    from mnist_pipeline.data.splits import load_split
    from mnist_pipeline.training import models
    from mnist_pipeline.training.fit import fit
    from mnist_pipeline.training.runtime import configure_job

    overrides = [] if name == "mlp" else [f"experiment={name}"]
    job = TrainJob.from_config(compose(ROOT / "conf", [*overrides, "train.verbose=2"]))
    runtime = configure_job(job)
    splits = {part: load_split(processed, part) for part in ("train", "val", "test")}
    record = new_record()
    score = scorer(
        clock,
        record,
        splits["test"].images,
        splits["test"].labels,
        max_epochs,
        float32_copy=lambda model: models.as_float32(model, job.model),
    )
    fit(
        job,
        runtime,
        splits["train"],
        splits["val"],
        steps_per_execution=job.runtime.steps_per_execution,
        extra_callbacks=[score],
    )
    record["precision"] = runtime.precision
    report.write_text(json.dumps(record))


# --- the parent ----------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The peer's mnist.npz and the pipeline's processed splits, of the same images."""
    import numpy as np

    from mnist_pipeline.data.splits import Split, save_split, stratified_split

    npz = work / "mnist.npz"
    if args.synthetic:
        arrays = synthetic_arrays(n_train=3000, n_test=1000)
        processed = work / "processed"
        train_idx, val_idx = stratified_split(arrays["y_train"], 300, seed=42)
        for part, index in (("train", train_idx), ("val", val_idx)):
            save_split(processed, part, Split(arrays["x_train"][index], arrays["y_train"][index]))
        save_split(processed, "test", Split(arrays["x_test"], arrays["y_test"]))
    else:
        arrays = raw_arrays(args.raw)
        processed = args.processed
    np.savez(npz, **arrays)
    return npz, processed


def run_recipe(
    name: str, npz: Path, processed: Path, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    report = work / f"{name}.json"
    script = str(Path(__file__).resolve())
    started = time.time()
    if name == "peer":
        command = [
            sys.executable,
            script,
            "--peer-child",
            str(npz),
            str(report),
            repr(started),
            str(args.max_epochs),
        ]
    else:
        command = [
            sys.executable,
            script,
            "--recipe-child",
            name,
            str(processed.resolve()),
            str(report),
            repr(started),
            str(args.max_epochs),
        ]
    done = run_measured(
        command, cwd=work, env=child_env(KERAS_HOME=str(work)), timeout=args.timeout
    ).check(f"recipe '{name}'", "time_to_accuracy")
    record = json.loads(report.read_text())
    record.update(peak_rss_mb=done.peak_rss_mb, wall_s=done.wall_s, cpu_s=done.cpu_s)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peer_child:
        npz, report, started, cap = args.peer_child
        return peer_child(Path(npz), Path(report), float(started), int(cap))
    if args.recipe_child:
        name, processed, report, started, cap = args.recipe_child
        return recipe_child(name, Path(processed), Path(report), float(started), int(cap))

    print(
        f"device: CPU: {cpu_model()} ({os.cpu_count()} cores); load average at start "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        work = Path(tmp)
        npz, processed = prepare_data(args, work)
        for name in args.recipes:
            results[name] = run_recipe(name, npz, processed, work, args)
            print(
                f"  {name}: done in {results[name]['wall_s']:.1f} s ({results[name]['precision']})",
                file=sys.stderr,
                flush=True,
            )
    print(table([row(name, record) for name, record in results.items()], HEADER))
    print(
        "t: seconds from process start to the end of the first epoch at that test accuracy "
        "(scoring time left out); '-': not reached"
    )
    if "peer" in results:
        peer = time_to(0.99, results["peer"]["since_start_s"], results["peer"]["test_accuracy"])
        for name, record in results.items():
            mine = time_to(0.99, record["since_start_s"], record["test_accuracy"])
            if name != "peer" and not math.isnan(mine) and not math.isnan(peer):
                print(f"  {name}: time to 99% = {mine / peer:.2f}x the peer's")
    print(f"load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
