"""The benchmarks: the shared harness's arithmetic and report helpers, each script's argument
checks, and one tiny end-to-end run of each."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.digits import ROOT

from mnist_pipeline.data.splits import Split, save_split

SCRIPT = ROOT / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def bench():
    yield from _benchmark_module(SCRIPT)


@pytest.fixture(scope="module")
def harness():
    yield from _benchmark_module(ROOT / "benchmarks" / "harness.py")


def test_mlp_flops_count_forward_and_both_gradients(bench):
    forward, training = bench.mlp_flops_per_sample((784, 512, 256, 10))
    products = 784 * 512 + 512 * 256 + 256 * 10
    assert forward == 2 * products
    # weight gradients of every layer, input gradients of all but the first
    assert training == 4 * products + 2 * (512 * 256 + 256 * 10)
    assert bench.epoch_flops(10, 2) == 10 * training + 2 * forward


def test_steady_epoch_time_leaves_out_the_first_epoch(harness):
    assert harness.steady_epoch_time([9.0, 1.0, 3.0, 2.0]) == 2.0
    assert harness.steady_epoch_time([4.0]) == 4.0
    assert harness.steady_epoch_time([]) != harness.steady_epoch_time([])  # NaN


def test_ratio_is_nan_when_undefined(harness):
    assert harness.ratio(1.0, 4.0) == 0.25
    for args in ((1.0, 0.0), (float("nan"), 1.0)):
        value = harness.ratio(*args)
        assert value != value


def test_stage_times_split_dvc_output_at_each_stage(harness):
    output = "\n".join(
        [
            "    0.50 Stage 'fetch' didn't change, skipping",
            "    0.60 Running stage 'preprocess':",
            "    2.00 Updating lock file 'dvc.lock'",
            "    2.10 Running stage 'train':",
            "    9.00 train: done",
            "   12.10 Running stage 'evaluate':",
            "   20.00 Use `dvc push` to send your updates to remote storage.",
        ]
    )
    before, stages = harness.stage_times(output)
    assert before == pytest.approx(0.6)
    assert stages == pytest.approx({"preprocess": 1.5, "train": 10.0, "evaluate": 7.9})


def test_arguments_are_validated(bench, capsys):
    args = bench.parse_args(["--epochs", "2", "--synthetic"])
    assert (args.epochs, args.repeats, args.skip_repro) == (2, 1, True)
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "0"])
    assert "--epochs: got 0" in capsys.readouterr().err


def test_table_aligns_columns(harness):
    text = harness.table([["a", "1.0"], ["bbb", "22.5"]], ["", "s"])
    assert text.splitlines() == ["        s", "a     1.0", "bbb  22.5"]


@pytest.mark.slow
def test_one_epoch_on_synthetic_data_reports_both_sides():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "1", "--skip-repro", "--synthetic"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "tutorial script #1" in out and "train stage #1" in out
    assert "stage, tutorial's split #1" in out and "48000+12000" in out
    assert "time per epoch" in out and "peak RSS" in out and "device:" in out


@pytest.mark.slow
def test_ablation_runs_its_variants_and_the_maths_stays_the_same(tmp_path):
    from helpers.digits import synthetic_digits

    for name, n, seed in (("train", 600, 1), ("val", 200, 2)):
        save_split(tmp_path, name, Split(*synthetic_digits(n, seed)))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "ablation.py"),
            "--processed",
            str(tmp_path),
            "--rounds",
            "1",
            "--only",
            "6",
            "7",
            "9",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.strip() and line.split()[0] in {"6", "7", "9"}
    }
    assert sorted(rows) == ["6", "7", "9"]
    assert "(= stage*)" in " ".join(rows["7"]) and "steps_per_execution 1" in " ".join(rows["9"])
    # Steps grouped 32 per call or one per call: the same steps, the same loss exactly.
    assert rows["6"][-1] == rows["9"][-1]
    # Each batch in two shards: the same steps up to float rounding.
    assert float(rows["7"][-1]) == pytest.approx(float(rows["6"][-1]), rel=1e-3)


# --- benchmarks/time_to_accuracy.py ----------------------------------------------------------

TTA_SCRIPT = ROOT / "benchmarks" / "time_to_accuracy.py"


def _benchmark_module(script: Path):
    """Load a benchmark script that imports its helpers from harness.py (beside it)."""
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(script.parent))


@pytest.fixture(scope="module")
def tta():
    yield from _benchmark_module(TTA_SCRIPT)


def test_time_to_a_threshold_is_the_first_epoch_that_reaches_it(tta):
    times, accuracies = [10.0, 20.0, 30.0], [0.97, 0.991, 0.989]
    assert tta.time_to(0.99, times, accuracies) == 20.0
    assert tta.time_to(0.97, times, accuracies) == 10.0
    assert math.isnan(tta.time_to(0.995, times, accuracies))


def test_row_reports_reached_thresholds_and_dashes(tta):
    record = {
        "epoch_time_s": [9.0, 4.0, 6.0],
        "since_start_s": [15.0, 19.0, 25.0],
        "test_accuracy": [0.985, 0.992, 0.9951],
        "peak_rss_mb": 1234.0,
        "wall_s": 30.0,
    }
    assert tta.row("fast", record) == [
        "fast",
        "5.00",
        "15.0",
        "19.0",
        "25.0",
        "0.9951",
        "3",
        "1,234",
        "30.0",
    ]
    record["test_accuracy"] = [0.5, 0.6, 0.7]
    assert tta.row("fast", record)[2:5] == ["-", "-", "-"]


def test_recipes_and_epoch_cap_are_validated(tta, capsys):
    args = tta.parse_args(["--recipes", "peer", "mlp", "cnn", "--max-epochs", "2"])
    assert (args.recipes, args.max_epochs) == (["peer", "mlp", "cnn"], 2)
    with pytest.raises(SystemExit):
        tta.parse_args(["--recipes", "nope"])
    assert "--recipes: got nope, expected peer, mlp or one of conf/experiment/" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        tta.parse_args(["--max-epochs", "-1"])
    assert "--max-epochs: got -1" in capsys.readouterr().err


@pytest.mark.slow
def test_time_to_accuracy_runs_the_peer_and_a_recipe_on_synthetic_digits(tmp_path):
    report = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(TTA_SCRIPT),
            "--synthetic",
            "--max-epochs",
            "1",
            "--recipes",
            "peer",
            "mlp",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    assert lines["peer"][6] == "1" and lines["mlp"][6] == "1"  # one epoch each: the cap
    results = json.loads(report.read_text())
    assert results["peer"]["precision"] == "float32"
    for record in results.values():
        assert len(record["test_accuracy"]) == 1 and 0 <= record["test_accuracy"][0] <= 1
        assert 0 < record["since_start_s"][0] < record["wall_s"]  # counted from process start
        assert record["peak_rss_mb"] > 100


# --- benchmarks/quick_experiment.py ----------------------------------------------------------

QE_SCRIPT = ROOT / "benchmarks" / "quick_experiment.py"


@pytest.fixture(scope="module")
def quick_experiment():
    yield from _benchmark_module(QE_SCRIPT)


def test_quick_experiment_arguments_are_validated(quick_experiment, tmp_path, capsys):
    with pytest.raises(SystemExit):
        quick_experiment.parse_args(["--runs", "0", "--raw", str(tmp_path)])
    assert "--runs: got 0, expected at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quick_experiment.parse_args(["--raw", str(tmp_path)])
    assert f"--raw {tmp_path}: no MNIST files there" in capsys.readouterr().err


def test_quick_experiment_report_has_every_run_and_the_medians(quick_experiment):
    def run(wall, accuracy, gate="passed"):
        return {
            "wall_s": wall,
            "cpu_s": wall + 2,
            "dvc_before_s": 2.0,
            "stages": {"train": 12.0, "champion": 1.0, "evaluate": wall - 15.3},
            "dvc_after_s": 0.3,
            "test_accuracy": accuracy,
            "gate": gate,
        }

    lines = quick_experiment.report(
        {
            "first": [run(24.0, 0.98), run(26.0, 0.9812), run(25.0, 0.9805)],
            "next": [run(23.5, 0.9821, "rejected")],
        },
        empty_s=0.02,
        startup_s=6.5,
    )
    text = "\n".join(lines)
    assert "first #3" in text and "next #1" in text and "rejected" in text
    assert "first: wall median 25.0 s (min 24.0, max 26.0); test accuracy 0.9800-0.9812" in text
    assert "next: wall median 23.5 s" in text
    assert "store opened): 6.50 s median; `python -c pass`: 0.02 s" in text
    header = lines[0].splitlines()[0].split()
    assert header[:3] == ["run", "wall", "s"] and "evaluate" in header


# --- benchmarks/gate_scenario.py -------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_scenario():
    yield from _benchmark_module(ROOT / "benchmarks" / "gate_scenario.py")


def test_corrupt_gate_scenario_arguments_are_validated(gate_scenario, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gate_scenario.parse_args(["--recipes", "fast", "nope", "--raw", str(tmp_path)])
    assert "--recipes: got nope, expected one of conf/experiment/: best, cnn, fast" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        gate_scenario.parse_args(["--raw", str(tmp_path)])
    assert f"--raw {tmp_path}: no MNIST files there" in capsys.readouterr().err
    for name in gate_scenario.RAW_FILES.values():
        (tmp_path / name).write_bytes(b"")
    assert gate_scenario.parse_args(["--raw", str(tmp_path)]).recipes == ["fast", "best", "robust"]


# --- benchmarks/robustness.py ----------------------------------------------------------------

ROBUSTNESS_SCRIPT = ROOT / "benchmarks" / "robustness.py"


@pytest.fixture(scope="module")
def robustness():
    yield from _benchmark_module(ROBUSTNESS_SCRIPT)


def test_corrupt_benchmark_arguments_are_validated(robustness, capsys):
    with pytest.raises(SystemExit):
        robustness.parse_args(["--recipes", "nope"])
    assert (
        "--recipes: got nope, expected mlp or one of conf/experiment/:" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        robustness.parse_args(["--max-epochs", "-2"])
    assert "--max-epochs: got -2" in capsys.readouterr().err
    assert robustness.overrides("fast", 1) == [
        "experiment=fast",
        "train.epochs=1",
        "train.verbose=0",
    ]
    assert robustness.overrides("mlp", 0) == ["train.verbose=0"]


def test_corrupt_benchmark_report_compares_each_recipe_with_fast(robustness):
    def result(clean, per):
        return {
            "train_s": 30.0,
            "epochs": 3,
            "clean": clean,
            "mean_corrupted": sum(per.values()) / len(per),
            "worst": min(per.items(), key=lambda item: item[1]),
            "per_corruption": per,
            "temperature": 1.1,
            "threshold": 0.98,
            "ece_raw": 0.02,
            "ece": 0.004,
            "corrupted_ece_raw": 0.1,
            "corrupted_ece": 0.08,
            "coverage": 0.95,
            "selective": 0.999,
            "corrupted_coverage": 0.6,
            "corrupted_selective": 0.98,
            "shift_s": 9.0,
        }

    text = robustness.report(
        {
            "fast": result(0.99, {"fog": 0.7, "zigzag": 0.9}),
            "robust": result(0.995, {"fog": 0.95, "zigzag": 0.85}),
        }
    )
    assert (
        "robust against fast: mean corruption accuracy +0.1000, better on 1 of 2 "
        "corruptions; clean +0.0050" in text
    )
    assert "fog 0.700" in text  # fast's worst corruption
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["fog"][1:] == ["0.7000", "0.9500"] and rows["zigzag"][1:] == ["0.9000", "0.8500"]


@pytest.mark.slow
def test_corrupt_benchmark_trains_and_scores_on_synthetic_digits(tmp_path):
    from mnist_pipeline.data import corruptions, suite
    from helpers.digits import synthetic_digits

    processed, corrupted = tmp_path / "processed", tmp_path / "corrupted"
    for name, n, seed in (("train", 600, 1), ("val", 200, 2), ("test", 200, 3)):
        save_split(processed, name, Split(*synthetic_digits(n, seed)))
    test = Split(*synthetic_digits(200, 3))
    suite.save(corrupted, corruptions.generate(test.images, ["fog", "stripe"], 0), test, 0)
    report = tmp_path / "out.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROBUSTNESS_SCRIPT),
            "--recipes",
            "fast",
            "mlp",
            "--max-epochs",
            "2",
            "--processed",
            str(processed),
            "--corrupted",
            str(corrupted),
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mlp against fast: mean corruption accuracy" in done.stdout
    results = json.loads(report.read_text())["results"]
    for record in results.values():
        assert record["epochs"] == 2 and 0 <= record["clean"] <= 1
        assert set(record["per_corruption"]) == {"fog", "stripe"}
        assert record["temperature"] > 0 and 0 <= record["coverage"] <= 1
