"""Bayesian hyperparameter search: an Optuna study whose trials are training jobs.

Why Optuna 5 itself rather than hydra-optuna-sweeper: the plugin pins `optuna<3`, so it
cannot be installed beside the Optuna this project locks, and as a Hydra sweeper it only
sees a job's return value, so it cannot stop a poor trial mid-training. Here each trial
reports its validation metric after every epoch and the study's pruner may stop it. The
search space keeps the plugin's notation: `conf/sweep/<space>.yaml` holds Hydra override
syntax (`choice`, `range`, `interval`, `tag(log, ...)`), parsed by Hydra's own
`OverridesParser` and mapped onto Optuna distributions.

How a sweep runs:
- `run` (the coordinator) creates or loads the study in its storage (SQLite at
  `<repository root>/sweeps/optuna.db` by default; any SQLAlchemy URL lets several machines
  share it), opens or reopens one parent MLflow run whose id the study keeps in its user
  attrs, and starts `sweep.n_jobs` worker processes. TensorFlow is imported in the workers
  only, and each gets `cores // n_jobs` threads.
- `work` (one worker) loops: count the trials that use up the budget (`sweep.n_trials` is
  the study's total, so a rerun only runs the missing ones) and run one more. A trial
  composes the Hydra config with its sampled overrides, validates it with the train stage's
  schemas and calls `job.train` as a child run of the parent. It writes no DVC output and
  logs no model: the best configuration is retrained by the pipeline.
- A running trial sends heartbeats to the storage; one whose worker died goes stale after
  `sweep.grace_s`, is failed, and its place in the budget goes to a new trial.
- At the end the coordinator logs the best trial on the parent run and writes it as
  `conf/experiment/<sweep.name>.yaml`, checked to compose back to the best trial's config.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from filelock import FileLock
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from . import config, params, project, startup, tracking
from .config import SweepConfig, SweepPrunerConfig, SweepSamplerConfig
from .errors import ConfigError, DataError, PipelineError, TrainingError
from .files import write_text

# The parts of a config a sweep may search and an experiment file sets: what is trained.
SEARCHED_SECTIONS = ("model", "optimizer", "train")
# How the sweep ran its trials, not what they computed: never written to the experiment.
NOT_IN_EXPERIMENT = ("train.verbose", "train.checkpoint")
# Sections a trial validates, exactly as the train stage does.
TRIAL_SECTIONS = ("paths", "model", "optimizer", "train", "runtime", "tracking")

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


# --- search space --------------------------------------------------------------------------

@dataclass(frozen=True)
class Dimension:
    """One searched key: its Optuna distribution and how a sampled value becomes an override."""

    key: str
    spec: str
    distribution: BaseDistribution
    # For a categorical: each choice as override text (`[512,256]`), by index.
    texts: tuple[str, ...] = ()

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            return f"{self.key}={self.texts[self.distribution.to_internal_repr(value)]}"
        return f"{self.key}={value!r}"

    def suggest(self, trial: optuna.Trial) -> str:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(self.key, d.choices)
        elif isinstance(d, IntDistribution):
            value = trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        else:
            assert isinstance(d, FloatDistribution)
            value = trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)
        return self.override(value)

    def probe(self) -> str:
        """An override with one valid value (the first choice, the low end)."""
        d = self.distribution
        return self.override(d.choices[0] if isinstance(d, CategoricalDistribution) else d.low)


def parse_space(space: Mapping[str, str]) -> list[Dimension]:
    """`sweep.params` (key -> Hydra sweep syntax) as Optuna distributions.

    `choice(a, b)` -> categorical (lists and dicts are choices too); `range(a, b[, step])`
    -> int (or stepped float) from a up to but excluding b, like Hydra and Python;
    `interval(a, b)` -> float; `tag(log, ...)` samples on a log scale.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import (ChoiceSweep, IntervalSweep, OverrideType,
                                                  RangeSweep, Transformer)
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    dimensions = []
    for key, spec in space.items():
        name = f"sweep.params.{key}"
        try:
            override = parser.parse_override(f"{key}={spec}")
        except HydraException as err:
            raise ConfigError(name, spec, f"Hydra sweep syntax ({str(err).splitlines()[0]})") \
                from None
        _check_searched_key(name, override.key_or_group)
        if override.type != OverrideType.CHANGE or override.package is not None:
            raise ConfigError(name, key, "a plain key: no '+', '++', '~' or '@package'")
        value = override.value()
        if not override.is_sweep_override():
            raise ConfigError(name, spec, "a sweep: choice(...), range(...) or interval(...); "
                                          "fixed values belong in sweep.overrides")
        tags = set(getattr(value, "tags", set()))
        if tags - {"log"}:
            raise ConfigError(name, spec, "no tag other than 'log'")
        log = "log" in tags
        try:
            if override.is_choice_sweep():
                if not isinstance(value, ChoiceSweep) or value.shuffle or log:
                    raise ConfigError(name, spec, "choice(a, b, ...) without shuffle or log")
                choices = list(override.sweep_iterator(transformer=Transformer.encode))
                texts = tuple(override.sweep_iterator(transformer=Transformer.str))
                if len(set(map(repr, choices))) != len(choices):
                    raise ConfigError(name, spec, "distinct choices")
                dimensions.append(Dimension(key, spec, CategoricalDistribution(choices), texts))
            elif override.is_range_sweep():
                assert isinstance(value, RangeSweep)
                if value.shuffle or not value.step or value.step < 0:
                    raise ConfigError(name, spec, "range(start, stop, step) with a step > 0")
                values = list(value.range())
                if not values:
                    raise ConfigError(name, spec, "a range holding at least one value")
                if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
                    distribution: BaseDistribution = IntDistribution(
                        values[0], values[-1], step=int(value.step), log=log)
                else:
                    distribution = FloatDistribution(
                        float(values[0]), float(values[-1]), step=float(value.step), log=log)
                dimensions.append(Dimension(key, spec, distribution))
            elif override.is_interval_sweep():
                assert isinstance(value, IntervalSweep)
                dimensions.append(Dimension(key, spec, FloatDistribution(
                    float(value.start), float(value.end), log=log)))
            else:
                raise ConfigError(name, spec, "choice(...), range(...) or interval(...)")
        except ValueError as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(name, spec, f"a valid distribution ({err})") from None
    return dimensions


def _check_searched_key(name: str, key: str) -> None:
    if key.split(".")[0] not in SEARCHED_SECTIONS:
        raise ConfigError(name, key, "a key or group of " + ", ".join(SEARCHED_SECTIONS)
                          + " (what a trial trains; data, paths and runtime are not searched)")


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line overrides -> (those that configure the sweep, those for every trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for_sweep, for_trials = [], []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:
            raise ConfigError("overrides", text, f"a Hydra override ({err})") from None
        key = override.key_or_group
        if key == "sweep" or key.startswith("sweep."):
            for_sweep.append(text)
        elif override.is_sweep_override():
            raise ConfigError("overrides", text, "a fixed value; searched keys belong in "
                                                 "the space (sweep.params in conf/sweep/)")
        else:
            for_trials.append(text)
    return for_sweep, for_trials


def fixed_keys(overrides: Sequence[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}


# --- composition ---------------------------------------------------------------------------

def compose(conf_dir: str | os.PathLike[str], overrides: Sequence[str]
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """The config `conf_dir` composes to with `overrides`, and the group options chosen.

    The same Hydra composition `dvc exp run -S` performs (see `params.compose`), plus the
    `model`/`optimizer`/... choices, which an experiment file needs to name.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        choices = {str(k): str(v) for k, v in cfg.hydra.runtime.choices.items()
                   if not str(k).startswith("hydra/") and v is not None}
        with open_dict(cfg):
            del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True), choices  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("overrides", list(overrides),
                          f"overrides that compose ({str(err).splitlines()[0]})") from None


def trial_sections(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a trial's config section by section, as the train stage does."""
    return {name: config.section(cfg, name) for name in TRIAL_SECTIONS}


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


def open_study(cfg: SweepConfig, *, sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study `cfg.name` in its storage, or load it if it exists."""
    url = storage_url(cfg)
    engine_kwargs: dict[str, Any] = {}
    lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    database = tracking.sqlite_file(url)
    if database is not None:
        # Writers wait for each other instead of failing with "database is locked"; two
        # processes creating a new database at once are serialised by a lock beside it.
        engine_kwargs = {"connect_args": {"timeout": 60}}
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(database) + ".lock", timeout=600)
    with lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_s,
            grace_period=cfg.grace_s)
        return optuna.create_study(storage=storage, study_name=cfg.name,
                                   direction=cfg.direction, sampler=sampler, pruner=pruner,
                                   load_if_exists=True)


def make_sampler(cfg: SweepSamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna 5's TPE is multivariate for one objective and, with `constant_liar`, treats
    # the trials other workers are running as bad, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials,
                                      constant_liar=True)


def make_pruner(cfg: SweepPrunerConfig, direction: str) -> optuna.pruners.BasePruner:
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials,
                                           n_warmup_steps=cfg.n_warmup_steps,
                                           interval_steps=cfg.interval_steps)
    if cfg.name == "successive_halving":
        # Its warm-up is min_resource: the first rung is at epoch min_resource.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource,
                                                      reduction_factor=cfg.reduction_factor)
    if cfg.name == "threshold":
        bound = {"lower" if direction == "maximize" else "upper": cfg.threshold}
        return optuna.pruners.ThresholdPruner(**bound, n_warmup_steps=cfg.n_warmup_steps,
                                              interval_steps=cfg.interval_steps)
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
    done: int      # complete, pruned, or failed in its objective
    running: int   # running or waiting, here or on another machine
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
        complete=states.count(TrialState.COMPLETE), pruned=states.count(TrialState.PRUNED),
        failed=sum(1 for t in trials if t.state == TrialState.FAIL))


# --- workers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a worker process needs (picklable: it crosses a process boundary)."""

    sweep: SweepConfig
    conf_dir: str
    overrides: tuple[str, ...]    # for every trial, before its sampled values
    space: tuple[Dimension, ...]
    parent_run_id: str
    worker: int
    seed: int


class Surplus(PipelineError):
    """Another worker took the study's last trial between our count and our ask."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise tracking.Interrupted(f"received signal {signum}")


def work(plan: Plan) -> None:
    """One worker process: run trials until the study holds `sweep.n_trials`."""
    # Ctrl-C reaches the coordinator, which stops its workers with SIGTERM: one signal
    # each, so a trial ends its MLflow run (KILLED) without a second interruption.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own line
    tracking.silence()
    startup.prepare()
    from . import job  # TensorFlow: imported by worker processes only

    cfg = plan.sweep
    study = open_study(cfg, sampler=make_sampler(cfg.sampler, plan.seed),
                       pruner=make_pruner(cfg.pruner, cfg.direction))

    def objective(trial: optuna.Trial) -> float:
        return run_trial(plan, study, trial, job.train)

    try:
        while True:
            now = progress(study)
            if now.remaining(cfg.n_trials) > 0:
                study.optimize(objective, n_trials=1, gc_after_trial=True,
                               catch=(TrainingError, ConfigError, Surplus))
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
    ahead = [t for t in study.get_trials(deepcopy=False)
             if t.number < trial.number and counts_toward_budget(t)]
    if len(ahead) >= cfg.n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise Surplus(f"trial {trial.number}: the study already has {cfg.n_trials} trials")

    overrides = [dimension.suggest(trial) for dimension in plan.space]
    trial.set_user_attr(OVERRIDES_ATTR, overrides)
    shown = describe(trial.params)
    try:
        sections = trial_sections(compose(plan.conf_dir, [*plan.overrides, *overrides])[0])
    except ConfigError as err:
        _fail(trial, err, shown)
        raise

    def report_epoch(epoch: int, logs: dict[str, float]) -> bool:
        trial.report(logs[cfg.metric], step=epoch + 1)  # step = epochs trained
        return trial.should_prune()

    started = time.perf_counter()
    try:
        outcome = train(
            model_cfg=sections["model"], optimizer_cfg=sections["optimizer"],
            train_cfg=sections["train"], runtime_cfg=sections["runtime"],
            tracking_cfg=sections["tracking"], processed_dir=sections["paths"].processed,
            checkpoint_dir=None, run_name=f"{study.study_name}-trial-{trial.number}",
            parent_run_id=plan.parent_run_id,
            tags={STUDY_TAG: study.study_name, TRIAL_TAG: str(trial.number),
                  "sweep.worker": str(plan.worker), "sweep.overrides": " ".join(overrides)},
            epoch_hook=report_epoch, log_model=False)
    except TrainingError as err:
        _fail(trial, err, shown)
        raise
    trial.set_user_attr(RUN_ATTR, outcome.run_id)
    values = outcome.history[cfg.metric]
    state = TrialState.PRUNED if outcome.stopped_by_hook else TrialState.COMPLETE
    tracking.set_tags({STATE_TAG: state.name}, run_id=outcome.run_id)
    print(f"sweep: trial {trial.number} {state.name.lower()} {cfg.metric} {values[-1]:.4f} "
          f"after {len(values)} epochs ({time.perf_counter() - started:.0f} s): {shown}",
          flush=True)
    if outcome.stopped_by_hook:
        raise optuna.TrialPruned(f"{cfg.metric} {values[-1]:.4f} after epoch {len(values)}")
    return values[-1]


def _fail(trial: optuna.Trial, err: Exception, shown: str) -> None:
    trial.set_user_attr(FAILURE_ATTR, str(err))
    print(f"sweep: trial {trial.number} failed: {err} ({shown})", flush=True)


def describe(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items())


def _run_workers(plans: Sequence[Plan]) -> list[int]:
    """Start one process per plan and wait; on Ctrl-C/SIGTERM stop them and re-raise."""
    context = multiprocessing.get_context("spawn")  # never fork a process that ran TF/MLflow
    processes = [context.Process(target=work, args=(plan,), name=f"sweep-worker-{plan.worker}")
                 for plan in plans]
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
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises `tracking.Interrupted` (a KeyboardInterrupt) in the coordinator."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the coordinator -----------------------------------------------------------------------

@dataclass
class Summary:
    name: str
    n_trials: int
    complete: int
    pruned: int
    failed: int
    ran: int
    workers: int
    wall_s: float
    parent_run_id: str
    metric: str
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] | None = None
    experiment: Path | None = None

    @property
    def line(self) -> str:
        head = (f"sweep: {self.name}: {self.complete + self.pruned + self.failed} trials "
                f"({self.complete} complete, {self.pruned} pruned, {self.failed} failed; "
                f"{self.ran} run now in {self.wall_s / 60:.1f} min)")
        if self.best_value is None:
            return f"{head}; no complete trial; parent run {self.parent_run_id}"
        return (f"{head}; best {self.metric} {self.best_value:.4f} (trial {self.best_trial}); "
                f"wrote {self.experiment}; parent run {self.parent_run_id}")


def run(conf_dir: str | os.PathLike[str], overrides: Sequence[str]) -> Summary:
    """Run (or continue) the sweep `+sweep=<space>` in `overrides`; see the module docstring."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking.silence()
    conf_dir = Path(conf_dir).resolve()
    _, for_trials = split_overrides(overrides)
    composed, _ = compose(conf_dir, overrides)
    if "sweep" not in composed:
        options = ", ".join(sorted(p.stem for p in (conf_dir / "sweep").glob("*.yaml")))
        raise ConfigError("sweep", None, f"a search space: +sweep=<one of {options}>")
    cfg: SweepConfig = config.section(composed, "sweep")
    tracking_cfg = config.section(composed, "tracking")

    # Fixed overrides win: a key set on the command line or in sweep.overrides is not searched.
    in_file, _ = split_overrides(cfg.overrides)
    if in_file:
        raise ConfigError("sweep.overrides", in_file, "overrides of the trials' config; "
                                                      "set sweep.* keys directly")
    fixed = [*cfg.overrides, *for_trials]
    pinned = fixed_keys(fixed)
    space = [d for d in parse_space(cfg.params) if d.key not in pinned]
    for key in sorted(pinned & set(cfg.params)):
        print(f"sweep: not searching {key}: fixed by an override")
    if not space:
        raise ConfigError("sweep.params", cfg.params, "at least one key not fixed by an override")

    # Fail before any worker starts: one trial's config must compose and validate.
    probe = trial_sections(compose(conf_dir, [*fixed, *(d.probe() for d in space)])[0])
    for split in ("train", "val", "test"):
        path = Path(probe["paths"].processed) / f"{split}.npz"
        if not path.is_file():
            raise DataError(f"{path}: not found (run the preprocess stage first: "
                            "dvc repro preprocess)")

    url = storage_url(cfg)
    study = open_study(cfg)
    search = json.loads(json.dumps({"space": {d.key: d.spec for d in space}, "overrides": fixed,
                                    "metric": cfg.metric}))
    stored = study.user_attrs.get(SEARCH_ATTR)
    if stored is None:
        study.set_user_attr(SEARCH_ATTR, search)
    elif stored != search:
        raise PipelineError(
            f"study '{cfg.name}' in {public_url(url)} was started with another search "
            f"({json.dumps(stored)}); rerun it with the same space and overrides, or name a "
            f"new study: sweep.name=<new name>")

    experiment_id = tracking.connect(tracking_cfg)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent and not tracking.live_run_exists(parent):
        raise PipelineError(f"study '{cfg.name}' logs to MLflow run {parent}, which is not in "
                            f"the tracking store {tracking.tracking_uri(tracking_cfg)}; point "
                            "MLFLOW_TRACKING_URI at that store or name a new study")
    started = time.perf_counter()
    with _sigterm_interrupts(), tracking.run(
            experiment_id, run_name=f"sweep-{cfg.name}", resume_run_id=parent,
            tags={STUDY_TAG: cfg.name, "sweep.storage": public_url(url)}) as parent_run_id:
        if parent is None:
            study.set_user_attr(PARENT_ATTR, parent_run_id)
            tracking.log_params({"sweep.name": cfg.name, "sweep.metric": cfg.metric,
                                 "sweep.direction": cfg.direction,
                                 "sweep.overrides": " ".join(fixed) or "-",
                                 **{f"sweep.space.{d.key}": d.spec for d in space}})
        tracking.set_tags({"sweep.sampler": cfg.sampler.name, "sweep.pruner": cfg.pruner.name,
                           "sweep.n_jobs": cfg.n_jobs}, run_id=parent_run_id)

        before = progress(study)
        n_workers = min(cfg.n_jobs, before.remaining(cfg.n_trials) + before.running)
        threads = max(1, cores() // cfg.n_jobs)
        plan = (f"{n_workers} worker process(es) with {threads} TensorFlow thread(s) each"
                if n_workers else "nothing left to run")
        print(f"sweep: study '{cfg.name}' in {public_url(url)}: {before.done} of {cfg.n_trials} "
              f"trials done; {plan}; parent MLflow run {parent_run_id}", flush=True)
        trials_before = len(study.get_trials(deepcopy=False))
        plans = [Plan(sweep=cfg, conf_dir=str(conf_dir), space=tuple(space),
                      overrides=(f"runtime.intra_op_threads={threads}", *fixed),
                      parent_run_id=parent_run_id, worker=index,
                      seed=worker_seed(cfg.sampler.seed, index, trials_before))
                 for index in range(n_workers)]
        exit_codes = _run_workers(plans)

        after = progress(study)
        summary = summarize(study, cfg, conf_dir, fixed, parent_run_id)
        summary.ran, summary.workers = after.done - before.done, n_workers
        summary.wall_s = time.perf_counter() - started
        crashed = [plan.worker for plan, code in zip(plans, exit_codes) if code]
        if crashed:
            raise PipelineError(f"worker(s) {crashed} stopped with an error (see above); "
                                "rerun the same command to continue the study")
        if summary.best_value is None:
            raise PipelineError(f"no trial of '{cfg.name}' completed ({summary.pruned} pruned, "
                                f"{summary.failed} failed): nothing to write; relax the pruner, "
                                "change the space or raise sweep.n_trials")
    return summary


# --- the summary ---------------------------------------------------------------------------

def summarize(study: optuna.Study, cfg: SweepConfig, conf_dir: Path, fixed: Sequence[str],
              parent_run_id: str) -> Summary:
    """Log the study's state and best trial on the parent run; write the experiment file."""
    trials = study.get_trials(deepcopy=False)
    now = progress(study)
    _tag_children(parent_run_id, {t.number: t for t in trials})
    summary = Summary(name=cfg.name, n_trials=cfg.n_trials, complete=now.complete,
                      pruned=now.pruned, failed=now.failed, ran=0, workers=0, wall_s=0.0,
                      parent_run_id=parent_run_id, metric=cfg.metric)
    finished = now.complete + now.pruned + now.failed
    metrics: dict[str, float] = {"trials_complete": now.complete, "trials_pruned": now.pruned,
                                 "trials_failed": now.failed, "trials_target": cfg.n_trials}
    if now.complete:
        best = study.best_trial
        assert best.value is not None
        summary.best_value, summary.best_trial = best.value, best.number
        summary.best_params = dict(best.params)
        metrics.update({f"best_{cfg.metric}": best.value, "best_trial": best.number})
        best_cfg, choices = compose(conf_dir, [*fixed, *best.user_attrs[OVERRIDES_ATTR]])
        header = (f"Best trial ({best.number}) of the Bayesian sweep '{cfg.name}': "
                  f"{cfg.metric} {best.value:.4f} on the validation split; {finished} trials: "
                  f"{now.complete} complete, {now.pruned} pruned, {now.failed} failed.")
        summary.experiment = write_experiment(conf_dir, cfg.name, best_cfg, choices, header)
        tracking.set_tags({**{f"best.{k}": v for k, v in best.params.items()},
                           "best.trial": best.number,
                           "best.mlflow_run_id": best.user_attrs.get(RUN_ATTR, "")},
                          run_id=parent_run_id)
        tracking.log_text(json.dumps({"trial": best.number, "value": best.value,
                                      "params": best.params,
                                      "overrides": best.user_attrs[OVERRIDES_ATTR]}, indent=2),
                          "best_params.json", run_id=parent_run_id)
    tracking.log_metrics(metrics, step=finished, run_id=parent_run_id)
    if finished:
        _log_plots(study, parent_run_id)
    return summary


def _tag_children(parent_run_id: str, trials: Mapping[int, FrozenTrial]) -> None:
    """Give every child run its trial's final state; end runs whose worker was killed."""
    for child in tracking.child_runs(parent_run_id):
        number = child.data.tags.get(TRIAL_TAG, "")
        trial = trials.get(int(number)) if number.isdigit() else None
        if trial is None or not trial.state.is_finished():
            continue
        if child.info.status == "RUNNING":
            tracking.end_run(child.info.run_id, "KILLED")
        if child.data.tags.get(STATE_TAG) != trial.state.name:
            tracking.set_tags({STATE_TAG: trial.state.name}, run_id=child.info.run_id)


def _log_plots(study: optuna.Study, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, plot in (("optimization_history.png", optuna_plots.plot_optimization_history),
                           ("intermediate_values.png", optuna_plots.plot_intermediate_values)):
            axes = plot(study)
            figure = axes.get_figure()
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            tracking.log_figure(figure, name, run_id=run_id)
            plt.close(figure)


# --- the experiment file -------------------------------------------------------------------

def experiment_text(conf_dir: str | os.PathLike[str], name: str, cfg: Mapping[str, Any],
                    choices: Mapping[str, str], header: str) -> str:
    """An experiment file that composes to `cfg`'s model, optimizer and train sections.

    Its defaults list picks the same group options; its body holds only the values that
    differ from those options' own, so it reads as what the sweep found.
    """
    groups = {group: choices[group] for group in SEARCHED_SECTIONS if group in choices}
    reference, _ = compose(conf_dir, [f"{group}={option}" for group, option in groups.items()])
    body = {}
    for section in SEARCHED_SECTIONS:
        changed = _difference(reference.get(section, {}), cfg[section], section)
        if changed:
            body[section] = changed
    comment = "".join(f"# {line}\n" for line in _wrap(header))
    return ("# @package _global_\n" + comment
            + "# Train it through the pipeline (the gate decides on it):\n"
            + f"#   dvc exp run -S experiment={name}\n"
            + "defaults:\n" + "".join(f"  - override /{g}: {o}\n" for g, o in groups.items())
            + "\n" + yaml.dump(body, Dumper=_ExperimentDumper, sort_keys=False))


def write_experiment(conf_dir: str | os.PathLike[str], name: str, cfg: Mapping[str, Any],
                     choices: Mapping[str, str], header: str) -> Path:
    """Write `conf/experiment/<name>.yaml` for `cfg`, once a copy of `conf/` proves it.

    The candidate is composed in a temporary copy of the config tree exactly as
    `dvc exp run -S experiment=<name>` will compose it; every section must validate and
    model/optimizer/train must equal `cfg`'s. Only then is the real file replaced.
    """
    text = experiment_text(conf_dir, name, cfg, choices, header)
    target = Path(conf_dir) / "experiment" / f"{name}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "conf"
        shutil.copytree(conf_dir, copy)
        (copy / "experiment").mkdir(exist_ok=True)
        (copy / "experiment" / f"{name}.yaml").write_text(text, encoding="utf-8")
        composed = params.compose(copy, [f"experiment={name}"])
    for section in composed:
        if section in config.SECTION_SCHEMAS or section in config.VARIANT_SCHEMAS:
            config.section(composed, section)
    for section in SEARCHED_SECTIONS:
        if _trained(composed[section], section) != _trained(cfg[section], section):
            raise PipelineError(f"{target}: would compose to {section} "
                                f"{composed[section]}, not the best trial's {cfg[section]}")
    write_text(target, text)
    return target


def _difference(reference: Mapping[str, Any], value: Mapping[str, Any], prefix: str
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        dotted = f"{prefix}.{key}"
        if dotted in NOT_IN_EXPERIMENT:
            continue
        if isinstance(item, Mapping) and isinstance(reference.get(key), Mapping):
            nested = _difference(reference[key], item, dotted)
            if nested:
                out[key] = nested
        elif reference.get(key) != item or key not in reference:
            out[key] = item
    return out


def _trained(section: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`section` without the keys that say how a run ran (verbosity, checkpoints)."""
    return {k: v for k, v in section.items() if f"{prefix}.{k}" not in NOT_IN_EXPERIMENT}


class _ExperimentDumper(yaml.SafeDumper):
    """Block mappings with lists inline (`hidden_units: [1024, 512]`), as conf/ is written."""


_ExperimentDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def _wrap(text: str, width: int = 88) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width)
