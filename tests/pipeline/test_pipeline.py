"""The whole pipeline through DVC in a throwaway repository: repro and what it prints,
metrics, queued grids."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from helpers import repo, tf_output

from mnist_pipeline.errors import DEBUG_ENV
from mnist_pipeline.tracking.runs import GIT_COMMIT

pytestmark = pytest.mark.slow

# What `dvc repro` prints: each stage's own summary once, one plain line per epoch.
SUMMARIES = (
    "fetch: 4 files verified",
    "preprocess: wrote",
    "train: mlp 2 epochs",
    "champion: ",
    "evaluate: test accuracy",
    "gate: PASSED",
)
EPOCH = (
    r"epoch (\d+)/2: loss [\d.]+, accuracy [\d.]+, val_loss [\d.]+, val_accuracy [\d.]+ "
    r"\([\d.]+ s\)"
)


@pytest.fixture()
def pipeline(tmp_path):
    return repo.make(tmp_path / "repo")


def _client(path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=repo.store(path))


def rule_passed(path, name: str) -> bool:
    rules = json.loads((path / "gate.json").read_text())["rules"]
    return next(rule for rule in rules if rule["name"] == name)["passed"]


def _dvc(path, *args: str, **env: str) -> str:
    """Both streams of `dvc <args>`, run as a log would capture them (not a terminal), with
    nothing set that quiets TensorFlow."""
    done = subprocess.run(
        ["dvc", *args],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=900,
        env=tf_output.unquieted_env(repo.env(), **env),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _assert_plain_lines(out: str) -> None:
    """No escape codes and no TensorFlow C++ start-up lines (back with MNIST_PIPELINE_DEBUG=1);
    each stage's summary once, one plain line per epoch, and the train stage says only its own
    lines (not Keras' epoch lines, not the ONNX converter's progress)."""
    assert "\x1b[" not in out
    assert tf_output.found(out) == [], out
    lines = out.splitlines()
    assert [m.group(1) for m in map(re.compile(EPOCH).fullmatch, lines) if m] == ["1", "2"], out
    assert not any(line.startswith("Epoch ") for line in lines), "Keras' own epoch lines"
    for summary in SUMMARIES:
        assert sum(line.startswith(summary) for line in lines) == 1, (summary, out)
    train = lines[lines.index("Running stage 'train':") + 2 :]
    train = train[: next(i for i, line in enumerate(train) if line.startswith("Updating lock"))]
    strays = [line for line in train if not (line.startswith("train: ") or re.match(EPOCH, line))]
    assert strays == [], out


def test_dvc_repro_runs_all_stages_and_promotes_a_champion(tmp_path):
    """...and its log is plain readable lines. (The queued grid below runs on a repository
    with no tracking store yet, so MLflow builds it there, as on a user's first run.)"""
    pipeline = repo.make(tmp_path / "repo", train={"verbose": 2}, store=True)
    out = _dvc(pipeline, "repro")
    _assert_plain_lines(out)
    stages = {"fetch", "preprocess", "corrupt", "train", "champion", "evaluate"}
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    assert set(lock["stages"]) == stages
    assert json.loads((pipeline / "gate.json").read_text())["champion_version"] == "1"
    report = json.loads((pipeline / "metrics/data.json").read_text())
    counts = (report["train"]["count"], report["val"]["count"], report["test"]["count"])
    assert counts == (500, 100, 200)

    metrics = json.loads(repo.run(["dvc", "metrics", "show", "--json"], pipeline).stdout)
    shown = json.dumps(metrics)
    for key in (
        "test_accuracy",
        "final_val_accuracy",
        "class_counts",
        "passed",
        "corrupted_mean_accuracy",
        "corrupted_worst",
        "ece_uncalibrated",
        "selective_accuracy",
        "temperature",
    ):
        assert key in shown
    evaluated = json.loads((pipeline / "metrics/evaluate.json").read_text())
    assert len(evaluated["corrupted_accuracy"]) == 15
    assert 0 < evaluated["clean"]["coverage"] <= 1
    for plot in (
        "corruption_accuracy.png",
        "corruption_accuracy.csv",
        "reliability.png",
        "reliability.csv",
        "model_card.md",
    ):
        assert (pipeline / "plots/evaluate" / plot).stat().st_size > 0, plot
    assert (
        "## Robustness: the corrupted test suite"
        in (pipeline / "plots/evaluate/model_card.md").read_text()
    )
    assert (pipeline / "plots/corruptions.png").stat().st_size > 0
    # Hydra never leaves its folders in the repository.
    assert not (pipeline / "outputs").exists() and not list(pipeline.rglob(".hydra"))
    client = _client(pipeline)
    champion = client.get_model_version_by_alias("mnist-classifier", "champion")
    assert str(champion.version) == "1"
    # MLflow tags the commit of the stage script's repository; the version carries it on.
    head = repo.run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    assert client.get_run(champion.run_id).data.tags[GIT_COMMIT] == head
    assert champion.tags["git.commit"] == head

    # Nothing changed: DVC runs only the cheap champion stage, which sees evaluate's own move.
    again = repo.run(["dvc", "repro"], pipeline)
    assert "Running stage 'train'" not in again.stdout
    assert "Running stage 'evaluate'" not in again.stdout
    assert "Running stage 'corrupt'" not in again.stdout
    assert len(client.search_model_versions("name = 'mnist-classifier'")) == 1
    # The train stage fitted a calibration, which the served model applies (the gate's smoke
    # test compared it with the calibrated Keras outputs); evaluate recorded per-image outcomes.
    fitted = json.loads((pipeline / "models/run.json").read_text())["calibration"]
    assert fitted["temperature"] > 0 and fitted["val_images"] == 100
    assert rule_passed(pipeline, "served_parity")
    assert "evaluation/outcomes.npz" in [
        a.path for a in client.list_artifacts(champion.run_id, "evaluation")
    ]

    # MNIST_PIPELINE_DEBUG=1 brings TensorFlow's start-up lines back.
    debug = _dvc(pipeline, "repro", "--force", "--single-item", "train", **{DEBUG_ENV: "1"})
    assert tuple(tf_output.found(debug)) == tf_output.printed_here()
    assert len(re.findall(EPOCH, debug)) == 2


def test_queued_grid_runs_every_experiment_into_the_root_store(pipeline):
    repo.run(
        ["dvc", "exp", "run", "--queue", "-S", "optimizer=sgd,adam", "-S", "train.epochs=1"],
        pipeline,
    )
    status = repo.run_queue(pipeline, 2)
    assert status.count("Success") == 2, (
        status + repo.run(["dvc", "queue", "logs", "-h"], pipeline, check=False).stdout
    )

    shown = json.loads(repo.run(["dvc", "exp", "show", "--json"], pipeline).stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    assert len(experiments) == 2
    optimizers = set()
    for exp in experiments:
        rev = exp["revs"][0]["data"]
        optimizers.add(rev["params"]["params.yaml"]["data"]["optimizer"]["name"])
        assert "test_accuracy" in json.dumps(rev["metrics"])
    assert optimizers == {"sgd", "adam"}

    client = _client(pipeline)
    runs = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    names = {r.data.tags.get("dvc.experiment") for r in runs}
    assert len(runs) == 2 and None not in names and len(names) == 2
    assert {r.data.params["optimizer.name"] for r in runs} == {"sgd", "adam"}
    # Each ran in a copy of the repository under .dvc/tmp/exps, at the baseline commit.
    head = repo.run(["git", "rev-parse", "HEAD"], pipeline).stdout.strip()
    assert [r.data.tags.get(GIT_COMMIT) for r in runs] == [head, head]
    assert not list((pipeline / ".dvc/tmp/exps").rglob("mlflow.db")), "no store in the temp copies"
