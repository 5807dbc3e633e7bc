"""Train speed and pipeline wall time: the train stage against the tutorial script.

    python benchmarks/train_speed.py --epochs 20 --repeats 1        # the full comparison
    python benchmarks/train_speed.py --epochs 2 --skip-repro        # a quick look (~1 min)

In one run, on the same data, it measures (see benchmarks/README.md):

1. the tutorial script (benchmarks/tutorial_mlp.py) in its own process, unchanged: a
   bootstrap replaces `keras.datasets.mnist.load_data` with a reader of an mnist.npz built
   from data/raw (nothing is downloaded) and wraps `keras.Model.fit`/`evaluate` to time
   each epoch with a callback and keep the test score;
2. the train stage, `python pipelines/train.py` with the default (tutorial) config, in its
   own process, writing into a temporary folder and a temporary MLflow store; its epoch
   times come from the store, its test accuracy from its saved model.

Tutorial and stage alternate (`--repeats`), so load from other processes hits both alike;
the ratios are the result. Peak RSS is each process's own (`os.wait4`). A probe process then
measures a large fp32 and bf16 matmul on the same device to put the achieved training
FLOP/s in proportion. Unless `--skip-repro`, it also times a cold `dvc repro` of the whole
pipeline in a throwaway copy of the repository with a fresh tracking store: once with the
raw files already fetched (fetch excluded) and, unless `--skip-fetch`, once from scratch
(the fetch stage downloads from its mirrors). Numbers are printed, never asserted.

This process imports no TensorFlow: everything measured runs in child processes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    Finished,
    ROOT,
    VENV_BIN,
    child_env,
    cpu_model,
    make_repo,
    ratio,
    raw_arrays,
    run_measured,
    scratch_dir,
    stage_times,
    steady_epoch_time,
    synthetic_arrays,
    table,
)

from mnist_pipeline.data.splits import Split, load_split, save_split, stratified_split

TUTORIAL = ROOT / "benchmarks" / "tutorial_mlp.py"
STAGE = ROOT / "pipelines" / "train.py"
# The tutorial MLP and the stage's default model: 784 -> 512 -> 256 -> 10.
LAYERS = (784, 512, 256, 10)
TUTORIAL_VALIDATION_SPLIT = 0.2  # as in benchmarks/tutorial_mlp.py
# --synthetic (the smoke test): the matmul's side for the peak (its figure means nothing then)
SYNTHETIC_MATMUL_N = 1024


# --- arguments -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train speed of the train stage vs the tutorial script, and the wall time "
        "of a cold `dvc repro`."
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="epochs for both the tutorial and the stage (default 20)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="tutorial/stage pairs, alternating (default 1)"
    )
    parser.add_argument(
        "--skip-repro", action="store_true", help="skip the cold `dvc repro` measurements"
    )
    parser.add_argument(
        "--skip-fetch",
        action="store_true",
        help="skip the `dvc repro` that fetches the raw files from scratch",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="learnable synthetic digits instead of data/, and a small matmul for the peak "
        "(smoke tests: the figures mean nothing)",
    )
    parser.add_argument(
        "--raw", type=Path, default=ROOT / "data" / "raw", help="folder of the four MNIST IDX files"
    )
    parser.add_argument(
        "--processed",
        type=Path,
        default=ROOT / "data" / "processed",
        help="folder of the train/val/test .npz splits the stage reads",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed to each measured process (default 1800)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= 1000:
        parser.error(f"--epochs: got {args.epochs}, expected an integer in [1, 1000]")
    if not 1 <= args.repeats <= 20:
        parser.error(f"--repeats: got {args.repeats}, expected an integer in [1, 20]")
    if args.synthetic:
        args.skip_repro = True  # the pipeline runs on the real files only
    return args


# --- arithmetic and formatting (pure; tested) -----------------------------------------------


def mlp_flops_per_sample(layers: Sequence[int] = LAYERS) -> tuple[int, int]:
    """(forward, training) multiply-add FLOPs per sample of a dense stack, biases ignored.

    Training = forward + weight gradients + input gradients of every layer but the first
    (nothing needs the gradient of the images).
    """
    products = [a * b for a, b in zip(layers[:-1], layers[1:], strict=True)]
    forward = 2 * sum(products)
    return forward, forward + 2 * sum(products) + 2 * sum(products[1:])


def epoch_flops(train_samples: int, val_samples: int, layers: Sequence[int] = LAYERS) -> int:
    forward, training = mlp_flops_per_sample(layers)
    return train_samples * training + val_samples * forward


# --- processes -----------------------------------------------------------------------------


# --- data ----------------------------------------------------------------------------------


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path]:
    """An mnist.npz for the tutorial, the processed splits for the stage (same images), and
    the tutorial's own split of them in the stage's format.

    The tutorial's `validation_split=0.2` validates on the last 20% of the training arrays
    and trains on the rest (48,000 + 12,000); the pipeline's default split is stratified,
    55,000 + 5,000. On the tutorial's split the stage does exactly the tutorial's work."""
    import numpy as np

    npz = work / "keras_home" / "datasets" / "mnist.npz"
    npz.parent.mkdir(parents=True)
    if args.synthetic:
        arrays = synthetic_arrays()  # MNIST's sizes: the tutorial script expects them
        processed = work / "processed"
        train_idx, val_idx = stratified_split(arrays["y_train"], 5000, seed=42)
        splits = {
            "train": (arrays["x_train"][train_idx], arrays["y_train"][train_idx]),
            "val": (arrays["x_train"][val_idx], arrays["y_train"][val_idx]),
            "test": (arrays["x_test"], arrays["y_test"]),
        }
        for name, (images, labels) in splits.items():
            save_split(processed, name, Split(images, labels))
    else:
        arrays = raw_arrays(args.raw)
        processed = args.processed
    np.savez(npz, **arrays)  # the layout of Keras' own mnist.npz
    same = work / "processed-tutorial-split"
    cut = round(len(arrays["y_train"]) * (1 - TUTORIAL_VALIDATION_SPLIT))
    for name, images, labels in (
        ("train", arrays["x_train"][:cut], arrays["y_train"][:cut]),
        ("val", arrays["x_train"][cut:], arrays["y_train"][cut:]),
        ("test", arrays["x_test"], arrays["y_test"]),
    ):
        save_split(same, name, Split(images, labels))
    return npz, processed, same


def split_sizes(processed: Path) -> dict[str, int]:
    import numpy as np

    sizes = {}
    for name in ("train", "val", "test"):
        with np.load(processed / f"{name}.npz") as npz:
            sizes[name] = int(npz["labels"].shape[0])
    return sizes


# --- the tutorial --------------------------------------------------------------------------


def tutorial_child(script: Path, npz: Path, report: Path) -> None:
    """Run the tutorial script unchanged, with local data and an epoch timer (child mode)."""
    import atexit
    import runpy

    import keras
    import numpy as np

    record: dict[str, Any] = {"epoch_time_s": [], "epoch_cpu_s": [], "fit": []}

    def load_data(path: str = "mnist.npz") -> tuple:
        """Keras' loader, reading the benchmark's mnist.npz instead of downloading."""
        with np.load(npz, allow_pickle=False) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            record["epoch_time_s"].append(time.perf_counter() - self.wall)
            record["epoch_cpu_s"].append(time.process_time() - self.cpu)

    original_fit, original_evaluate = keras.Model.fit, keras.Model.evaluate
    fitting: list[bool] = []

    def fit(self: keras.Model, *args: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochTimer()]
        x = args[0] if args else kwargs.get("x")
        record["fit"].append(
            {
                "samples": int(getattr(x, "shape", [0])[0]),
                "validation_split": float(kwargs.get("validation_split", 0.0)),
            }
        )
        fitting.append(True)
        try:
            return original_fit(self, *args, **kwargs)
        finally:
            fitting.pop()

    def evaluate(self: keras.Model, *args: Any, **kwargs: Any) -> Any:
        score = original_evaluate(self, *args, **kwargs)
        if not fitting:  # fit() validates through evaluate(); keep the script's own call
            record["test_loss"], record["test_accuracy"] = (float(v) for v in score[:2])
        return score

    def write() -> None:
        report.write_text(json.dumps(record))

    keras.datasets.mnist.load_data = load_data
    keras.Model.fit, keras.Model.evaluate = fit, evaluate
    atexit.register(write)
    sys.argv = [str(script)]
    runpy.run_path(str(script), run_name="__main__")


@dataclass
class Measured:
    """One training process: the tutorial script or the train stage."""

    name: str
    epoch_times: list[float]
    train_samples: int
    val_samples: int
    test_accuracy: float
    process: Finished
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def s_per_epoch(self) -> float:
        return steady_epoch_time(self.epoch_times)

    @property
    def samples_per_s(self) -> float:
        return ratio(self.train_samples, self.s_per_epoch)

    @property
    def flops_per_s(self) -> float:
        return ratio(epoch_flops(self.train_samples, self.val_samples), self.s_per_epoch)


def run_tutorial(npz: Path, work: Path, epochs: int, timeout: float) -> Measured:
    script = TUTORIAL
    if epochs != 20:  # the published script fixes 20 epochs; a copy with fewer for quick runs
        script = work / "tutorial_mlp.py"
        text = TUTORIAL.read_text(encoding="utf-8")
        script.write_text(text.replace("NB_EPOCH = 20", f"NB_EPOCH = {epochs}"), encoding="utf-8")
    report = work / "tutorial.json"
    report.unlink(missing_ok=True)
    keras_home = npz.parent.parent
    done = run_measured(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--tutorial-child",
            str(script),
            str(npz),
            str(report),
        ],
        cwd=work,
        env=child_env(KERAS_HOME=str(keras_home)),
        timeout=timeout,
    ).check("the tutorial script")
    record = json.loads(report.read_text())
    fitted = record["fit"][0]
    train = round(fitted["samples"] * (1 - fitted["validation_split"]))
    return Measured(
        "tutorial script",
        record["epoch_time_s"],
        train,
        fitted["samples"] - train,
        record.get("test_accuracy", float("nan")),
        done,
        {"epoch_cpu_s": record["epoch_cpu_s"]},
    )


# --- the train stage -----------------------------------------------------------------------


def run_stage(
    processed: Path,
    sizes: dict[str, int],
    work: Path,
    folder_name: str,
    epochs: int,
    timeout: float,
    name: str = "train stage",
) -> Measured:
    folder = work / folder_name
    folder.mkdir()
    store = folder / "mlflow.db"
    overrides = [
        f"paths.processed={processed.resolve()}",
        f"paths.model={folder}/model.keras",
        f"paths.run={folder}/run.json",
        f"paths.train_metrics={folder}/train.json",
        f"paths.train_history={folder}/history.csv",
        f"paths.checkpoints={folder}/checkpoints",
        f"train.epochs={epochs}",
    ]
    # cwd is the temporary folder: MLflow's default artifact root (./mlruns) lands there.
    done = run_measured(
        [sys.executable, str(STAGE), *overrides],
        cwd=folder,
        env=child_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}"),
        timeout=timeout,
    ).check("the train stage")
    with sqlite3.connect(store) as db:
        times = [
            v
            for _, v in db.execute(
                "select step, value from metrics where key = 'epoch_time_s' order by step"
            )
        ]
        params = dict(db.execute("select key, value from params where key like 'runtime.%'"))
    return Measured(
        name,
        times,
        sizes["train"],
        sizes["val"],
        float("nan"),
        done,
        {"model": folder / "model.keras", "params": params},
    )


# --- the probe: device, matmul peaks, the stage model's test accuracy ------------------------


def probe_child(report: Path, processed: Path, models_json: str, matmul_n: int = 0) -> None:
    """Device name, large fp32/bf16 matmul FLOP/s (`matmul_n` a side; 0: 8192 on a GPU, 4096
    on a CPU), and test accuracy of saved models."""
    import numpy as np
    import tensorflow as tf

    from mnist_pipeline.training import models
    from mnist_pipeline.training.fit import predict as predict_probabilities

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    else:
        device = f"CPU: {cpu_model()} ({os.cpu_count()} cores)"
    n = matmul_n or (8192 if gpus else 4096)
    peaks = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.cast(tf.random.uniform((n, n)), dtype)
        b = tf.cast(tf.random.uniform((n, n)), dtype)
        matmul = tf.function(
            lambda x, y: tf.reduce_sum(tf.cast(tf.matmul(x, y)[:1, :1], tf.float32))
        )
        float(matmul(a, b))  # trace and warm up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            float(matmul(a, b))
            best = min(best, time.perf_counter() - start)
        peaks[dtype.name] = 2 * n**3 / best
    test = load_split(processed, "test")
    accuracy = {}
    for path in json.loads(models_json):
        probabilities = predict_probabilities(models.load(path), test.images)
        accuracy[path] = float(np.mean(probabilities.argmax(1) == test.labels))
    report.write_text(
        json.dumps(
            {"device": device, "matmul_flops": peaks, "matmul_n": n, "test_accuracy": accuracy}
        )
    )


def run_probe(
    work: Path, processed: Path, model_paths: list[Path], timeout: float, matmul_n: int = 0
) -> dict:
    report = work / "probe.json"
    run_measured(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--probe-child",
            str(report),
            str(processed.resolve()),
            json.dumps([str(p) for p in model_paths]),
            str(matmul_n),
        ],
        cwd=work,
        env=child_env(),
        timeout=timeout,
    ).check("the probe")
    return json.loads(report.read_text())


# --- cold `dvc repro` ----------------------------------------------------------------------


def cold_repro(work: Path, name: str, raw: Path | None, timeout: float) -> dict[str, Any]:
    repo = work / name
    make_repo(repo, raw)
    done = run_measured(
        ["dvc", "repro"], cwd=repo, env=child_env(), timeout=timeout, stamp_lines=True
    ).check(f"dvc repro ({name})")
    before, stages = stage_times(done.output)
    served = re.findall(r"fetch: \d+ files verified in \S+ \((.*)\)", done.output)
    return {
        "wall_s": done.wall_s,
        "dvc_startup_s": before,
        "stages": stages,
        "fetch": served[0] if served else None,
        "peak_rss_mb": done.peak_rss_mb,
    }


# --- report --------------------------------------------------------------------------------


def environment_lines() -> list[str]:
    site = Path(shutil.which("python", path=str(VENV_BIN)) or sys.executable).parent.parent
    cached = any((site / "lib").glob("python3*/site-packages/tensorflow/__pycache__/*.pyc"))
    lines = [
        f"python {platform.python_version()}; bytecode cache of site-packages: "
        f"{'present' if cached else 'MISSING (every process compiles TF/Keras/MLflow)'}"
        f"; PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}"
    ]
    return lines


def report_training(
    tutorials: list[Measured],
    stages: list[Measured],
    probe: dict,
    same_split: list[Measured] | None = None,
) -> tuple[list[str], dict[str, float]]:
    """The table of every run, then the ratios of each stage variant to the tutorial."""
    peaks = probe["matmul_flops"]
    same_split = same_split or []
    rows = []
    for number, group in enumerate(itertools.zip_longest(tutorials, stages, same_split), 1):
        for m in filter(None, group):
            rows.append(
                [
                    f"{m.name} #{number}",
                    f"{m.s_per_epoch:.3f}",
                    f"{m.epoch_times[0]:.2f}",
                    f"{m.samples_per_s:,.0f}",
                    f"{m.test_accuracy:.4f}",
                    f"{m.process.peak_rss_mb:,.0f}",
                    f"{m.process.wall_s:.1f}",
                    f"{m.flops_per_s / 1e9:.0f}",
                    f"{m.train_samples}+{m.val_samples}",
                ]
            )
    lines = [
        table(
            rows,
            [
                "",
                "s/epoch",
                "1st",
                "samples/s",
                "test acc",
                "peak MB",
                "wall s",
                "GFLOP/s",
                "train+val",
            ],
        )
    ]
    med = medians("tutorial", tutorials)
    params = stages[-1].extra["params"]
    lines += [
        "",
        f"stage ran {params.get('runtime.resolved_precision')}, XLA "
        f"{params.get('runtime.resolved_jit_compile')}, on "
        f"{params.get('runtime.device')}",
    ]
    # Time per epoch: at most 0.40x on the pipeline's split, 0.35x on the same work.
    variants = [("stage", stages, "the pipeline's split", 0.40)]
    if same_split:
        variants.append(("same_split", same_split, "the tutorial's own split, the same work", 0.35))
    for prefix, runs, label, epoch_target in variants:
        ours = medians(prefix, runs)
        med.update(ours)
        r = {
            "epoch_ratio": ratio(ours[f"{prefix}_s_per_epoch"], med["tutorial_s_per_epoch"]),
            "sample_time_ratio": ratio(
                med["tutorial_samples_per_s"], ours[f"{prefix}_samples_per_s"]
            ),
            "rss_ratio": ratio(ours[f"{prefix}_rss_mb"], med["tutorial_rss_mb"]),
            "accuracy_points": 100 * (ours[f"{prefix}_accuracy"] - med["tutorial_accuracy"]),
            "wall_ratio": ratio(ours[f"{prefix}_wall_s"], med["tutorial_wall_s"]),
        }
        med.update({f"{prefix}_{key}": value for key, value in r.items()})
        lines += [
            f"stage / tutorial, the stage on {label} ({runs[0].train_samples} + "
            f"{runs[0].val_samples} images per epoch; the tutorial: {tutorials[0].train_samples}"
            f" + {tutorials[0].val_samples}), medians of {len(runs)} run(s):",
            f"  time per epoch     {r['epoch_ratio']:.2f}x   (target <= {epoch_target:.2f})",
            f"  time per sample    {r['sample_time_ratio']:.2f}x",
            f"  peak RSS           {r['rss_ratio']:.2f}x   (target <= 0.75)",
            f"  test accuracy      {r['accuracy_points']:+.2f} points   (target within +-0.3)",
            f"  process wall time  {r['wall_ratio']:.2f}x",
        ]
    # The default stage's ratios also under their historical names (JSON readers).
    for key in ("epoch_ratio", "sample_time_ratio", "rss_ratio", "accuracy_points"):
        med[key] = med[f"stage_{key}"]
    lines += [
        f"matmul peak here ({probe['matmul_n']}^3): fp32 {peaks['float32'] / 1e9:,.0f} GFLOP/s, "
        f"bf16 {peaks['bfloat16'] / 1e9:,.0f} GFLOP/s",
        f"training achieves: tutorial {med['tutorial_flops'] / 1e9:.0f} GFLOP/s = "
        f"{med['tutorial_flops'] / peaks['float32']:.0%} of the fp32 peak; stage "
        f"{med['stage_flops'] / 1e9:.0f} GFLOP/s = {med['stage_flops'] / peaks['float32']:.0%} "
        f"of the fp32 peak, {med['stage_flops'] / peaks['bfloat16']:.0%} of the bf16 peak",
        f"  (FLOPs/epoch = train images x {mlp_flops_per_sample()[1]:,} + validation images x "
        f"{mlp_flops_per_sample()[0]:,}: forward, weight and input gradients, biases ignored)",
    ]
    return lines, med


def medians(prefix: str, runs: list[Measured]) -> dict[str, float]:
    """Medians over runs of the per-run figures, keyed `<prefix>_<figure>`."""
    figures = {
        "s_per_epoch": lambda m: m.s_per_epoch,
        "samples_per_s": lambda m: m.samples_per_s,
        "rss_mb": lambda m: m.process.peak_rss_mb,
        "wall_s": lambda m: m.process.wall_s,
        "accuracy": lambda m: m.test_accuracy,
        "flops": lambda m: m.flops_per_s,
    }
    return {
        f"{prefix}_{name}": statistics.median(get(m) for m in runs) for name, get in figures.items()
    }


def report_repro(name: str, result: dict[str, Any], tutorial_wall: float) -> list[str]:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stages"].items())
    line = (
        f"{name}: {result['wall_s']:.1f} s = {ratio(result['wall_s'], tutorial_wall):.2f}x "
        f"the tutorial script's {tutorial_wall:.1f} s (dvc start-up "
        f"{result['dvc_startup_s']:.1f} s; stages, s: {stages})"
    )
    if result.get("fetch"):
        line += f"; fetch served: {result['fetch']}"
    return [line]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--tutorial-child"]:
        tutorial_child(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return
    if argv[:1] == ["--probe-child"]:
        probe_child(Path(argv[1]), Path(argv[2]), argv[3], int(argv[4]))
        return
    args = parse_args(argv)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with scratch_dir("train-speed-", args.keep) as work:
        print(
            f"train_speed: {args.epochs} epochs, {args.repeats} repeat(s), "
            f"{'synthetic data' if args.synthetic else 'data/'}; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start",
            flush=True,
        )
        npz, processed, same = prepare_data(args, work)
        sizes, same_sizes = split_sizes(processed), split_sizes(same)
        tutorials: list[Measured] = []
        stages: list[Measured] = []
        same_split: list[Measured] = []
        for run in range(args.repeats):
            order = ["tutorial", "stage", "same split"]
            for which in order if run % 2 == 0 else order[::-1]:
                print(f"  run {run + 1}: {which} ...", flush=True)
                if which == "tutorial":
                    tutorials.append(run_tutorial(npz, work, args.epochs, args.timeout))
                elif which == "stage":
                    stages.append(
                        run_stage(processed, sizes, work, f"stage{run}", args.epochs, args.timeout)
                    )
                else:
                    same_split.append(
                        run_stage(
                            same,
                            same_sizes,
                            work,
                            f"same{run}",
                            args.epochs,
                            args.timeout,
                            name="stage, tutorial's split",
                        )
                    )
        probe = run_probe(
            work,
            processed,
            [m.extra["model"] for m in stages + same_split],
            args.timeout,
            matmul_n=SYNTHETIC_MATMUL_N if args.synthetic else 0,
        )
        for m in stages + same_split:
            m.test_accuracy = probe["test_accuracy"][str(m.extra["model"])]
        lines, med = report_training(tutorials, stages, probe, same_split)
        results.update(device=probe["device"], matmul_flops=probe["matmul_flops"], **med)
        results["runs"] = [
            {
                "name": m.name,
                "epoch_time_s": m.epoch_times,
                "wall_s": m.process.wall_s,
                "peak_rss_mb": m.process.peak_rss_mb,
                "test_accuracy": m.test_accuracy,
                "train_samples": m.train_samples,
            }
            for m in tutorials + stages + same_split
        ]
        print()
        print(f"device: {probe['device']}; {environment_lines()[0]}")
        print("\n".join(lines))
        if not args.skip_repro:
            tutorial_wall = med["tutorial_wall_s"]
            print(
                "\ncold dvc repro of the whole pipeline (fresh repo copy and tracking store):",
                flush=True,
            )
            warm = cold_repro(work, "repro-fetched", args.raw, args.timeout)
            results["repro_fetch_excluded"] = warm
            print(
                "\n".join(report_repro("  raw files already fetched", warm, tutorial_wall)),
                flush=True,
            )
            if not args.skip_fetch:
                scratch = cold_repro(work, "repro-scratch", None, args.timeout)
                results["repro_from_scratch"] = scratch
                print("\n".join(report_repro("  fetch from scratch", scratch, tutorial_wall)))
        print(
            f"\nload average {os.getloadavg()[0]:.1f} at the end "
            "(other processes' load inflates wall times; compare the ratios)"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
