"""Sweep worker processes: each runs trials (training jobs) until the study's budget is met."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import startup
from ..config import SweepConfig, TrainJob
from ..config.compose import compose_with_choices as compose
from ..errors import ConfigError, Interrupted, PipelineError, TrainingError
from ..tracking import runs, store
from .space import Dimension
from .study import (
    FAILURE_ATTR,
    OVERRIDES_ATTR,
    RUN_ATTR,
    STATE_TAG,
    STUDY_TAG,
    SURPLUS_ATTR,
    TRIAL_TAG,
    counts_toward_budget,
    make_pruner,
    make_sampler,
    open_study,
    progress,
)

# --- workers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a worker process needs (picklable: it crosses a process boundary)."""

    sweep: SweepConfig
    conf_dir: str
    overrides: tuple[str, ...]  # for every trial, before its sampled values
    space: tuple[Dimension, ...]
    parent_run_id: str
    worker: int
    seed: int


class Surplus(PipelineError):
    """Another worker took the study's last trial between our count and our ask."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"received signal {signum}")


def work(plan: Plan) -> None:
    """One worker process: run trials until the study holds `sweep.n_trials`."""
    # Ctrl-C reaches the coordinator, which stops its workers with SIGTERM: one signal
    # each, so a trial ends its MLflow run (KILLED) without a second interruption.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own line
    store.silence()
    startup.prepare()
    startup.load_tensorflow()  # worker processes only; the coordinator never loads it
    from ..training import job

    cfg = plan.sweep
    study = open_study(
        cfg,
        sampler=make_sampler(cfg.sampler, plan.seed),
        pruner=make_pruner(cfg.pruner, cfg.direction),
    )

    def objective(trial: optuna.Trial) -> float:
        return run_trial(plan, study, trial, job.train)

    try:
        while True:
            now = progress(study)
            if now.remaining(cfg.n_trials) > 0:
                study.optimize(
                    objective,
                    n_trials=1,
                    gc_after_trial=True,
                    catch=(TrainingError, ConfigError, Surplus),
                )
            elif now.running:
                # Another worker's trial is running; if that worker is dead, the trial
                # goes stale and its place in the budget comes back to us.
                time.sleep(cfg.heartbeat_s)
            else:
                return
    except KeyboardInterrupt:
        # Stopped by the coordinator: the trial is FAIL (rerun later), its run KILLED.
        raise SystemExit(130) from None


def run_trial(plan: Plan, study: optuna.Study, trial: optuna.Trial, train: Any) -> float:
    """The objective: train one sampled config; its last-epoch validation metric."""
    cfg = plan.sweep
    ahead = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and counts_toward_budget(t)
    ]
    if len(ahead) >= cfg.n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise Surplus(f"trial {trial.number}: the study already has {cfg.n_trials} trials")

    overrides = [dimension.suggest(trial) for dimension in plan.space]
    trial.set_user_attr(OVERRIDES_ATTR, overrides)
    shown = describe(trial.params)
    try:
        # Validated exactly as the train stage validates its config.
        train_job = TrainJob.from_config(compose(plan.conf_dir, [*plan.overrides, *overrides])[0])
    except ConfigError as err:
        _fail(trial, err, shown)
        raise

    def report_epoch(epoch: int, logs: dict[str, float]) -> bool:
        trial.report(logs[cfg.metric], step=epoch + 1)  # step = epochs trained
        return trial.should_prune()

    started = time.perf_counter()
    try:
        outcome = train(
            train_job,
            checkpoint_dir=None,
            run_name=f"{study.study_name}-trial-{trial.number}",
            parent_run_id=plan.parent_run_id,
            tags={
                STUDY_TAG: study.study_name,
                TRIAL_TAG: str(trial.number),
                "sweep.worker": str(plan.worker),
                "sweep.overrides": " ".join(overrides),
            },
            epoch_hook=report_epoch,
            log_model=False,
        )
    except TrainingError as err:
        _fail(trial, err, shown)
        raise
    trial.set_user_attr(RUN_ATTR, outcome.run_id)
    values = outcome.history[cfg.metric]
    state = TrialState.PRUNED if outcome.stopped_by_hook else TrialState.COMPLETE
    runs.set_tags({STATE_TAG: state.name}, run_id=outcome.run_id)
    print(
        f"sweep: trial {trial.number} {state.name.lower()} {cfg.metric} {values[-1]:.4f} "
        f"after {len(values)} epochs ({time.perf_counter() - started:.0f} s): {shown}",
        flush=True,
    )
    if outcome.stopped_by_hook:
        raise optuna.TrialPruned(f"{cfg.metric} {values[-1]:.4f} after epoch {len(values)}")
    return values[-1]


def _fail(trial: optuna.Trial, err: Exception, shown: str) -> None:
    trial.set_user_attr(FAILURE_ATTR, str(err))
    print(f"sweep: trial {trial.number} failed: {err} ({shown})", flush=True)


def describe(values: Mapping[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def run_workers(plans: Sequence[Plan]) -> list[int]:
    """Start one process per plan and wait; on Ctrl-C/SIGTERM stop them and re-raise."""
    context = multiprocessing.get_context("spawn")  # never fork a process that ran TF/MLflow
    processes = [
        context.Process(target=work, args=(plan,), name=f"sweep-worker-{plan.worker}")
        for plan in plans
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()  # SIGTERM: its MLflow run ends KILLED, its trial FAIL
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
        raise
    return [process.exitcode or 0 for process in processes]


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises `Interrupted` (a KeyboardInterrupt) in the coordinator."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
