"""The Optuna study: its storage, sampler and pruner, and which trials use up its budget."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from .. import project
from ..config import SweepConfig, SweepPrunerConfig, SweepSamplerConfig
from ..tracking import locks, store

# Study user attrs.
PARENT_ATTR = "mlflow_parent_run_id"
SEARCH_ATTR = "search"
# Trial user attrs: its overrides, why its objective failed, its MLflow run.
OVERRIDES_ATTR = "overrides"
FAILURE_ATTR = "failure"
SURPLUS_ATTR = "surplus"
RUN_ATTR = "mlflow_run_id"
# Child-run tags.
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial"
STATE_TAG = "optuna.state"


# --- the study -----------------------------------------------------------------------------


def storage_url(cfg: SweepConfig) -> str:
    """`sweep.storage`, else SQLite at `<repository root>/sweeps/optuna.db`."""
    if cfg.storage:
        return cfg.storage
    return f"sqlite:///{project.root() / 'sweeps' / 'optuna.db'}"


def public_url(url: str) -> str:
    """`url` without its password, for logs and tags."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_study(
    cfg: SweepConfig,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study `cfg.name` in its storage, or load it if it exists."""
    url = storage_url(cfg)
    engine_kwargs: dict[str, Any] = {}
    database = store.sqlite_file(url)
    if database is not None:
        # Writers wait for each other instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}}
        database.parent.mkdir(parents=True, exist_ok=True)
    # Two processes creating a new storage's tables at once collide: one at a time.
    with storage_lock(url, "create"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
        storage = HeartbeatFromBirth(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=cfg.heartbeat_s,
            grace_period=cfg.grace_s,
        )
        return optuna.create_study(
            storage=storage,
            study_name=cfg.name,
            direction=cfg.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )


class HeartbeatFromBirth(optuna.storages.RDBStorage):
    """An RDB storage whose new RUNNING trials record their first heartbeat as they are made.

    Optuna records a trial's first heartbeat only after `study.ask` returns, once the sampler
    has run, and it never fails a RUNNING trial that has no heartbeat at all. A worker killed
    in that window would leave a trial that runs forever, and a study that never fills: the
    other workers wait for it. Here the gap is two back-to-back writes of one process.
    """

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING and self.heartbeat_interval is not None:
            self.record_heartbeat(trial._trial_id)
        return trial


def storage_lock(url: str, name: str) -> contextlib.AbstractContextManager[Any]:
    """A lock every process using the storage `url` sees: a file beside a SQLite database, an
    advisory lock on a PostgreSQL one (any machine); none for other databases."""
    database = store.sqlite_file(url)
    if database is not None:
        return FileLock(f"{database}.{name}.lock", timeout=600)
    if url.startswith(locks.POSTGRES_SCHEMES):
        return locks.held(f"optuna:{name}", url)
    return contextlib.nullcontext()


def make_sampler(cfg: SweepSamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna 5's TPE is multivariate for one objective and, with `constant_liar`, treats
    # the trials other workers are running as bad, so parallel workers spread out.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=cfg.n_startup_trials, constant_liar=True
    )


def make_pruner(cfg: SweepPrunerConfig, direction: str) -> optuna.pruners.BasePruner:
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials,
            n_warmup_steps=cfg.n_warmup_steps,
            interval_steps=cfg.interval_steps,
        )
    if cfg.name == "successive_halving":
        # Its warm-up is min_resource: the first rung is at epoch min_resource.
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.name == "threshold":
        bound = {"lower" if direction == "maximize" else "upper": cfg.threshold}
        return optuna.pruners.ThresholdPruner(
            **bound, n_warmup_steps=cfg.n_warmup_steps, interval_steps=cfg.interval_steps
        )
    return optuna.pruners.NopPruner()


def worker_seed(seed: int, worker: int, trials_before: int) -> int:
    """Distinct per worker and per restart, so no two samplers draw the same sequence."""
    import numpy as np

    return int(np.random.SeedSequence([seed, worker, trials_before]).generate_state(1)[0])


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Whether `trial` uses up one of the study's `n_trials`.

    Every trial counts except the failed ones that never ran their objective to the end:
    a stale trial of a killed worker, one interrupted by Ctrl-C, a surplus one. A trial
    whose training failed (NaN loss, invalid config) counts: it had its chance.
    """
    return trial.state != TrialState.FAIL or FAILURE_ATTR in trial.user_attrs


@dataclass(frozen=True)
class Progress:
    done: int  # complete, pruned, or failed in its objective
    running: int  # running or waiting, here or on another machine
    complete: int
    pruned: int
    failed: int

    def remaining(self, n_trials: int) -> int:
        return max(n_trials - self.done - self.running, 0)


def progress(study: optuna.Study) -> Progress:
    """Where the study stands, after failing trials whose worker stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    return Progress(
        done=sum(1 for t in trials if t.state.is_finished() and counts_toward_budget(t)),
        running=states.count(TrialState.RUNNING) + states.count(TrialState.WAITING),
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        failed=sum(1 for t in trials if t.state == TrialState.FAIL),
    )
