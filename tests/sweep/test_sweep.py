"""Bayesian sweeps: the search space, parallel trials as nested MLflow runs, pruning,
resuming a study, the experiment file, and no DVC output or registry write."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import config as test_config
from helpers.digits import ROOT, synthetic_digits
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mnist_pipeline import config
from mnist_pipeline.config.compose import compose, compose_with_choices
from mnist_pipeline.data.splits import Split, save_split
from mnist_pipeline.errors import ConfigError
from mnist_pipeline.sweep.coordinator import run
from mnist_pipeline.sweep.report import write_experiment
from mnist_pipeline.sweep.space import parse_space
from mnist_pipeline.sweep.study import (
    FAILURE_ATTR,
    PARENT_ATTR,
    STATE_TAG,
    TRIAL_TAG,
    Progress,
    open_study,
    progress,
)

# A space small enough to train in seconds, with every kind of dimension (the rest of the
# sweep section is conf/sweep/mlp.yaml's).
TINY_SPACE = {
    "name": "tiny",
    "n_trials": 2,
    "n_jobs": 2,
    "pruner": {"name": "none", "n_startup_trials": 0, "n_warmup_steps": 0, "threshold": None},
    "overrides": [
        "train.epochs=2",
        "train.verbose=0",
        "runtime.jit_compile=false",
        "runtime.steps_per_execution=1",
    ],
    "params": {
        "optimizer.learning_rate": "tag(log, interval(0.02, 0.2))",
        "train.batch_size": "choice(32, 64)",
        "model.hidden_units": "choice([16], [32, 16])",
    },
}


# --- the search space ----------------------------------------------------------------------


def test_hydra_sweeps_map_onto_optuna_distributions():
    space = {
        d.key: d
        for d in parse_space(
            {
                "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-1))",
                "model.dropout": "interval(0, 0.5)",
                "optimizer": "choice(sgd, adam, rmsprop)",
                "model.hidden_units": "choice([512, 256], [128])",
                "train.epochs": "range(2, 11, 4)",
                "model.units": "tag(log, range(16, 257))",
            }
        )
    }
    assert space["optimizer.learning_rate"].distribution == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["model.dropout"].distribution == FloatDistribution(0.0, 0.5)
    assert space["optimizer"].distribution == CategoricalDistribution(["sgd", "adam", "rmsprop"])
    assert space["optimizer"].override("adam") == "optimizer=adam"
    hidden = space["model.hidden_units"]
    assert hidden.distribution == CategoricalDistribution(["[512,256]", "[128]"])
    assert hidden.override("[512,256]") == "model.hidden_units=[512,256]"
    # Hydra's range excludes its stop, like Python's: 2, 6, 10.
    assert space["train.epochs"].distribution == IntDistribution(2, 10, step=4)
    assert space["model.units"].distribution == IntDistribution(16, 256, log=True)
    assert space["optimizer.learning_rate"].override(0.003) == "optimizer.learning_rate=0.003"


@pytest.mark.parametrize(
    "key, spec, expected",
    [
        ("optimizer.learning_rate", "0.01", "a sweep"),
        ("optimizer.learning_rate", "tag(squared, interval(0.1, 1))", "no tag other than 'log'"),
        ("optimizer.learning_rate", "tag(log, interval(0, 1))", "a valid distribution"),
        ("optimizer.learning_rate", "interval(0.1", "Hydra sweep syntax"),
        ("train.batch_size", "shuffle(choice(32, 64))", "without shuffle"),
        ("train.batch_size", "range(64, 32)", "at least one value"),
        ("train.batch_size", "choice(32, 32)", "distinct choices"),
        ("runtime.precision", "choice(float32, mixed_bfloat16)", "model, optimizer, train"),
        ("paths.processed", "choice(a, b)", "model, optimizer, train"),
    ],
)
def test_bad_search_spaces_fail_naming_the_key(key, spec, expected):
    with pytest.raises(ConfigError) as info:
        parse_space({key: spec})
    assert f"sweep.params.{key}" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_shipped_spaces_compose_and_validate_as_trials(name):
    cfg = compose(ROOT / "conf", [f"+sweep={name}"])
    sweep_cfg = config.section(cfg, "sweep")
    space = parse_space(sweep_cfg.params)
    assert sweep_cfg.metric.startswith("val_")
    for dimension in space:  # every choice of every dimension composes and validates
        values = (
            dimension.distribution.choices
            if isinstance(dimension.distribution, CategoricalDistribution)
            else (dimension.distribution.low, dimension.distribution.high)
        )
        for value in values:
            overrides = [
                *sweep_cfg.overrides,
                *(d.probe() for d in space if d is not dimension),
                dimension.override(value),
            ]
            job = config.TrainJob.from_config(compose_with_choices(ROOT / "conf", overrides)[0])
            assert job.train.verbose == 0


def test_sweep_group_stays_out_of_params_yaml():
    assert "sweep" not in yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("n_jobs", 0, "[1, 256]"),
        ("n_trials", 0, "[1, 100000]"),
        ("metric", "test_accuracy", "'val_accuracy'"),
        ("direction", "minimize", "'maximize' for metric 'val_accuracy'"),
        ("name", "../escape", "letters, digits"),
        ("grace_s", 5, "> sweep.heartbeat_s"),
    ],
)
def test_bad_sweep_settings_fail_naming_key_value_and_allowed(key, value, expected):
    with pytest.raises(ConfigError) as info:
        test_config.section("sweep", **{**TINY_SPACE, key: value})
    assert f"'sweep.{key}'" in str(info.value) and expected in str(info.value)


def test_threshold_pruner_needs_a_threshold():
    with pytest.raises(ConfigError, match="sweep.pruner.threshold"):
        test_config.section("sweep", **{**TINY_SPACE, "pruner": {"name": "threshold"}})


# --- the budget ----------------------------------------------------------------------------


def _sweep_cfg(tmp_path, **values) -> config.SweepConfig:
    return test_config.section(
        "sweep", **{**TINY_SPACE, "storage": f"sqlite:///{tmp_path / 'o.db'}", **values}
    )


def test_only_trials_that_ran_their_objective_use_up_the_budget(tmp_path):
    study = open_study(_sweep_cfg(tmp_path))
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.9))
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    study.add_trial(
        optuna.trial.create_trial(  # its training diverged: it had its chance
            state=TrialState.FAIL, user_attrs={FAILURE_ATTR: "loss became NaN"}
        )
    )
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))  # interrupted
    now = progress(study)
    assert (now.done, now.running, now.failed) == (3, 0, 2)
    assert now.remaining(5) == 2


def _until_the_first_trial_fails(study: optuna.Study) -> Progress:
    """Poll `progress` (which fails stale trials) until trial 0 is FAIL; the last progress.
    Stale `grace_s` after its last heartbeat; a busy machine lags, so up to 60 s."""
    deadline = time.monotonic() + 60
    now = progress(study)
    while study.trials[0].state != TrialState.FAIL and time.monotonic() < deadline:
        time.sleep(0.2)
        now = progress(study)
    assert study.trials[0].state == TrialState.FAIL
    return now


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_dead_workers_trial_goes_stale_and_frees_its_place(tmp_path):
    study = open_study(_sweep_cfg(tmp_path, heartbeat_s=1, grace_s=2))
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)  # a later beat; then its worker is killed
    assert progress(study).remaining(2) == 1
    now = _until_the_first_trial_fails(study)
    assert (now.done, now.running, now.remaining(2)) == (0, 0, 2)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_worker_killed_before_its_first_heartbeat_thread_beat_still_goes_stale(tmp_path):
    # `ask` made the trial RUNNING and the worker died before Optuna's heartbeat thread
    # started (the sampler runs in between): the trial still has a heartbeat, and goes stale.
    study = open_study(_sweep_cfg(tmp_path, heartbeat_s=1, grace_s=2))
    study.ask()
    assert progress(study).running == 1
    now = _until_the_first_trial_fails(study)
    assert (now.done, now.running, now.remaining(2)) == (0, 0, 2)


# --- the experiment file -------------------------------------------------------------------


def test_experiment_file_holds_the_difference_and_composes_back(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    overrides = [
        "optimizer=adam",
        "optimizer.learning_rate=0.0031",
        "train.epochs=3",
        "model.hidden_units=[64,32]",
        "train.verbose=0",
        "train.lr_schedule.name=cosine",
    ]
    best, choices = compose_with_choices(conf, overrides)
    path = write_experiment(conf, "found", best, choices, "a header")
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    written = yaml.safe_load(text)
    assert written["defaults"] == [
        {"override /model": "mlp"},
        {"override /optimizer": "adam"},
        {"override /train": "default"},
    ]
    assert written["optimizer"] == {"learning_rate": 0.0031}
    assert written["model"] == {"hidden_units": [64, 32]}
    assert written["train"] == {"epochs": 3, "lr_schedule": {"name": "cosine"}}  # no verbose
    composed = compose(conf, ["experiment=found"])
    for name in composed:
        config.section(composed, name)
    assert composed["optimizer"] == best["optimizer"]
    assert composed["model"] == best["model"]


# --- a real sweep: two workers, then resumed with forced pruning ---------------------------


@pytest.mark.slow
def test_parallel_sweep_resumes_prunes_and_writes_an_experiment(tmp_path, monkeypatch):
    """Phase 1: 2 trials on 2 workers, no pruning. Phase 2: the same study resumed to 4
    trials on 2 workers with a pruner that prunes every trial after its first epoch.

    One test, not one per check: both phases cost a TensorFlow start per worker, and a
    module fixture would be rebuilt on each pytest-xdist worker that gets one of the checks.
    """
    from mlflow import MlflowClient

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "sweep" / "tiny.yaml").write_text(
        yaml.safe_dump(test_config.values("sweep", **TINY_SPACE))
    )
    for name, n, seed in (("train", 300, 1), ("val", 100, 2), ("test", 100, 3)):
        save_split(tmp_path / "data" / "processed", name, Split(*synthetic_digits(n, seed)))
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    first = run(tmp_path / "conf", ["+sweep=tiny"])
    second = run(
        tmp_path / "conf",
        [
            "+sweep=tiny",
            "sweep.n_trials=4",
            "sweep.pruner.name=threshold",
            "sweep.pruner.threshold=1.01",
            "sweep.pruner.n_warmup_steps=0",
        ],
    )

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/sweeps/optuna.db")
    trials = study.trials
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs([experiment.experiment_id])

    # One parent run for the study, reused when it was resumed; every trial a child of it.
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "sweep-tiny"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert first.parent_run_id == second.parent_run_id == parent.info.run_id
    assert study.user_attrs[PARENT_ATTR] == parent.info.run_id
    assert first.workers == second.workers == 2
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        number = int(child.data.tags[TRIAL_TAG])
        assert child.data.tags[STATE_TAG] == trials[number].state.name
        assert child.data.params["model.name"] == "mlp"

    # The resumed study ran exactly the missing trials: 2, then 2 more to reach 4.
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert (first.ran, second.ran) == (2, 2)

    # Phase 1 had no pruner; in phase 2 every trial was pruned after its first epoch.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in trials[2:])
    epochs = {int(r.data.tags[TRIAL_TAG]): r.data.metrics["epochs_run"] for r in children}
    assert epochs == {0: 2, 1: 2, 2: 1, 3: 1}
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["trials_complete"] == 2
    assert parent.data.metrics["trials_pruned"] == 2
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "intermediate_values.png", "best_params.json"} <= artifacts

    # The best trial is an experiment file that composes (as `dvc exp run -S` would) to it.
    conf = tmp_path / "conf"
    assert second.experiment == conf / "experiment" / "tiny.yaml"
    composed = compose(conf, ["experiment=tiny"])
    for name in composed:
        config.section(composed, name)
    best = study.best_trial.params
    assert composed["optimizer"]["learning_rate"] == best["optimizer.learning_rate"]
    assert composed["train"]["batch_size"] == best["train.batch_size"]
    assert str(composed["model"]["hidden_units"]).replace(" ", "") == best["model.hidden_units"]
    assert composed["train"]["epochs"] == 2 and composed["train"]["verbose"] == 2

    # No DVC output, no model logged or registered; only the study, the store and the file.
    for name, path in test_config.values("paths").items():
        if name not in ("raw", "processed"):
            assert not (tmp_path / path).exists(), path
    created = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} - before
    tops = {p.parts[0] for p in created if not p.parts[0].startswith("store.db")}  # -wal, -shm
    assert tops <= {"sweeps", "mlartifacts", "mlruns", ".locks", "conf"}
    assert [p for p in created if p.parts[0] == "conf"] == [Path("conf/experiment/tiny.yaml")]
    assert client.search_registered_models() == []
    assert client.search_logged_models(experiment_ids=[experiment.experiment_id]) == []


@pytest.mark.slow
def test_cli_rejects_a_bad_sweep_before_any_work(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "sweep.py"),
            "--conf",
            str(tmp_path / "conf"),
            "+sweep=mlp",
            "sweep.n_jobs=0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "sweep: error: config 'sweep.n_jobs': got 0" in done.stderr
    missing = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "sweep.py"), "--conf", str(tmp_path / "conf")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "+sweep=<one of cnn, mlp>" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no outputs/, .hydra/, sweeps/


def test_a_sweep_never_replaces_a_hand_written_recipe_kept_in_git(tmp_path):
    import subprocess

    from mnist_pipeline.errors import ConfigError
    from mnist_pipeline.sweep.report import check_target, sweep_marker

    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    hand = conf / "experiment" / "picked.yaml"
    hand.write_text("# @package _global_\n# picked by hand\n")
    assert check_target(conf, "picked") == hand  # not in git yet: a sweep may write it
    subprocess.run(["git", "add", "conf"], cwd=tmp_path, check=True)
    with pytest.raises(ConfigError, match="sweep.name=picked-sweep"):
        check_target(conf, "picked")
    assert hand.read_text() == "# @package _global_\n# picked by hand\n"
    swept = conf / "experiment" / "found.yaml"  # one a sweep wrote, then committed
    swept.write_text(f"# @package _global_\n# Best trial (3) {sweep_marker('found')}: ...\n")
    subprocess.run(["git", "add", "conf"], cwd=tmp_path, check=True)
    assert check_target(conf, "found") == swept
    assert check_target(conf, "new") == conf / "experiment" / "new.yaml"
