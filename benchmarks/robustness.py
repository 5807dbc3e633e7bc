"""Robustness and calibration of the built-in recipes, trained and scored in one run: clean and
mean corruption accuracy on the corrupted suite, ECE before and after temperature scaling,
and coverage at the abstention threshold.

    python benchmarks/robustness.py                              # mlp fast best robust
    python benchmarks/robustness.py --recipes fast robust        # a pair
    python benchmarks/robustness.py --max-epochs 2 --recipes fast   # plumbing only

Needs data/processed and data/corrupted (`dvc repro corrupt`). Each recipe trains in its
own process with the train stage's `fit` on data/processed (55,000 training, 5,000
validation images), without MLflow; the process saves the float32 model and the calibration
fitted on the validation split, as the train stage logs them. This process then scores every
model with evaluate's own functions (`promotion.measure`, `promotion.measure_shift`) on the
official test set and the suite, and compares each recipe with `fast`, corruption by
corruption. Numbers are printed, never asserted. `mlp` is the tutorial MLP (the default
config); every other name is `conf/experiment/<name>.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import ROOT, add_recipes, check_recipes, child_env, cpu_model, run_measured, table

DEFAULT_RECIPES = ("mlp", "fast", "best", "robust")
BASELINE = "fast"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipes(parser, DEFAULT_RECIPES, ("mlp",))
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="train each recipe for this many epochs instead, its schedule "
        "fitted to them (more than its warm-up; 0: its own)",
    )
    parser.add_argument("--processed", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--corrupted", type=Path, default=ROOT / "data" / "corrupted")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed to each recipe's training (default 1800)",
    )
    parser.add_argument("--recipe-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.recipe_child:
        return args
    if args.max_epochs < 0:
        parser.error(f"--max-epochs: got {args.max_epochs}, expected an integer >= 0")
    check_recipes(parser, args.recipes, ("mlp",))
    return args


def overrides(name: str, max_epochs: int) -> list[str]:
    out = [] if name == "mlp" else [f"experiment={name}"]
    return out + ([f"train.epochs={max_epochs}"] if max_epochs else []) + ["train.verbose=0"]


# --- the child: train one recipe -----------------------------------------------------------


def recipe_child(name: str, processed: Path, out: Path, max_epochs: int) -> None:
    """Train `name` with the stage's `fit`; save the float32 model and its calibration."""
    from mnist_pipeline import startup

    startup.prepare()
    startup.load_tensorflow()
    from mnist_pipeline.config import TrainJob
    from mnist_pipeline.config.compose import compose
    from mnist_pipeline.data.splits import load_split
    from mnist_pipeline.training import job, models
    from mnist_pipeline.training.fit import fit
    from mnist_pipeline.training.runtime import configure_job

    train_job = TrainJob.from_config(compose(ROOT / "conf", overrides(name, max_epochs)))
    runtime = configure_job(train_job)
    splits = {part: load_split(processed, part) for part in ("train", "val")}
    started = time.perf_counter()
    result = fit(
        train_job,
        runtime,
        splits["train"],
        splits["val"],
        steps_per_execution=train_job.runtime.steps_per_execution,
    )
    train_s = time.perf_counter() - started
    model = models.as_float32(result.model, train_job.model)
    fitted = job.calibrate(model, splits["val"], train_job.train.calibration)
    models.save(model, out / "model.keras")
    (out / "record.json").write_text(
        json.dumps(
            {
                "train_s": train_s,
                "epochs": result.epochs_run,
                "precision": runtime.precision,
                "calibration": fitted.to_dict(),
            }
        )
    )


# --- the parent: score every model ---------------------------------------------------------


def score(folder: Path, processed: Path, corrupted: Path) -> dict[str, Any]:
    """Evaluate's measurements of the model in `folder` (clean test set, suite, confidence)."""
    from mnist_pipeline import startup

    startup.load_tensorflow()  # the first model to score loads it; then nothing to do
    from mnist_pipeline.config import EvaluateConfig
    from mnist_pipeline.data import suite
    from mnist_pipeline.data.splits import load_split
    from mnist_pipeline.evaluation import promotion
    from mnist_pipeline.training import calibration, models
    from mnist_pipeline.training.fit import predict

    record = json.loads((folder / "record.json").read_text())
    fitted = calibration.Calibration.from_dict(record["calibration"])
    model = models.load(folder / "model.keras")
    test = load_split(processed, "test")
    corrupted_suite = suite.load(corrupted, test)
    cfg = EvaluateConfig(batch_size=1000, misclassified_grid=1)  # evaluate's batch size
    predict(model, test.images[:1000])  # build and warm up before the clock starts
    probabilities, scores = promotion.measure(model, test, cfg)
    started = time.perf_counter()
    shift = promotion.measure_shift(model, probabilities, corrupted_suite, fitted, cfg)
    shift_s = time.perf_counter() - started
    return {
        "train_s": record["train_s"],
        "epochs": record["epochs"],
        "clean": scores.accuracy,
        "mean_corrupted": shift.mean_accuracy,
        "worst": shift.worst,
        "per_corruption": shift.accuracy,
        "temperature": fitted.temperature,
        "threshold": fitted.threshold,
        "ece_raw": shift.clean.ece_raw,
        "ece": shift.clean.ece,
        "corrupted_ece_raw": shift.corrupted.ece_raw,
        "corrupted_ece": shift.corrupted.ece,
        "coverage": shift.clean.coverage,
        "selective": shift.clean.selective_accuracy,
        "corrupted_coverage": shift.corrupted.coverage,
        "corrupted_selective": shift.corrupted.selective_accuracy,
        "shift_s": shift_s,
    }


def report(results: dict[str, dict[str, Any]]) -> str:
    """The tables: per recipe, then per corruption, then each recipe against `fast`."""
    rows = [
        [
            name,
            f"{r['train_s']:.0f}",
            f"{r['clean']:.4f}",
            f"{r['mean_corrupted']:.4f}",
            f"{r['worst'][0]} {r['worst'][1]:.3f}",
            f"{r['ece_raw']:.4f}",
            f"{r['ece']:.4f}",
            f"{r['temperature']:.3g}",
            f"{r['coverage']:.3f}",
            f"{r['selective']:.4f}",
            f"{r['corrupted_ece_raw']:.4f}",
            f"{r['corrupted_ece']:.4f}",
            f"{r['corrupted_coverage']:.3f}",
            f"{r['shift_s']:.1f}",
        ]
        for name, r in results.items()
    ]
    lines = [
        table(
            rows,
            [
                "recipe",
                "train s",
                "clean",
                "corrupted",
                "worst",
                "ECE",
                "ECE scaled",
                "T",
                "coverage",
                "sel. acc",
                "c. ECE",
                "c. ECE scaled",
                "c. coverage",
                "suite s",
            ],
        ),
        "",
    ]
    names = list(next(iter(results.values()))["per_corruption"])
    lines.append(
        table(
            [[c, *(f"{r['per_corruption'][c]:.4f}" for r in results.values())] for c in names],
            ["corruption", *results],
        )
    )
    base = results.get(BASELINE)
    if base is not None:
        lines.append("")
        for name, r in results.items():
            if name == BASELINE:
                continue
            wins = sum(r["per_corruption"][c] > base["per_corruption"][c] for c in names)
            lines.append(
                f"{name} against {BASELINE}: mean corruption accuracy "
                f"{r['mean_corrupted'] - base['mean_corrupted']:+.4f}, better on "
                f"{wins} of {len(names)} corruptions; clean "
                f"{r['clean'] - base['clean']:+.4f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.recipe_child:
        name, processed, out, max_epochs = args.recipe_child
        recipe_child(name, Path(processed), Path(out), int(max_epochs))
        return
    print(f"robustness: {cpu_model()}; recipes {', '.join(args.recipes)}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="robustness-") as work:
        for name in args.recipes:
            out = Path(work) / name
            out.mkdir()
            run_measured(
                [
                    sys.executable,
                    __file__,
                    "--recipe-child",
                    name,
                    str(args.processed),
                    str(out),
                    str(args.max_epochs),
                ],
                cwd=ROOT,
                env=child_env(),
                timeout=args.timeout,
            ).check(f"training {name}", "robustness")
            results[name] = score(out, args.processed, args.corrupted)
            print(
                f"robustness: {name}: clean {results[name]['clean']:.4f}, corrupted "
                f"{results[name]['mean_corrupted']:.4f} ({results[name]['train_s']:.0f} s "
                "training)",
                flush=True,
            )
    print()
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
