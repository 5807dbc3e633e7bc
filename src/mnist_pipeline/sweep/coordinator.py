"""The sweep coordinator: opens the study and its parent run, starts the workers, sums up."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import optuna

from .. import startup
from ..config import SweepConfig, TrainJob
from ..config import loading as config
from ..config.compose import compose_with_choices as compose
from ..errors import ConfigError, DataError, PipelineError
from ..tracking import runs, store
from .report import Summary, check_target, summarize
from .space import fixed_keys, parse_space, split_overrides
from .study import (
    PARENT_ATTR,
    SEARCH_ATTR,
    STUDY_TAG,
    open_study,
    progress,
    public_url,
    storage_lock,
    storage_url,
    worker_seed,
)
from .workers import Plan, run_workers, sigterm_interrupts


def run(conf_dir: str | os.PathLike[str], overrides: Sequence[str]) -> Summary:
    """Run (or continue) the sweep `+sweep=<space>` in `overrides`; see the module docstring."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store.silence()
    conf_dir = Path(conf_dir).resolve()
    _, for_trials = split_overrides(overrides)
    composed, _ = compose(conf_dir, overrides)
    if "sweep" not in composed:
        options = ", ".join(sorted(p.stem for p in (conf_dir / "sweep").glob("*.yaml")))
        raise ConfigError("sweep", None, f"a search space: +sweep=<one of {options}>")
    cfg: SweepConfig = config.section(composed, "sweep")
    tracking_cfg = config.section(composed, "tracking")
    check_target(conf_dir, cfg.name)  # before hours of trials, not after

    # Fixed overrides win: a key set on the command line or in sweep.overrides is not searched.
    in_file, _ = split_overrides(cfg.overrides)
    if in_file:
        raise ConfigError(
            "sweep.overrides", in_file, "overrides of the trials' config; set sweep.* keys directly"
        )
    fixed = [*cfg.overrides, *for_trials]
    pinned = fixed_keys(fixed)
    space = [d for d in parse_space(cfg.params) if d.key not in pinned]
    for key in sorted(pinned & set(cfg.params)):
        print(f"sweep: not searching {key}: fixed by an override")
    if not space:
        raise ConfigError("sweep.params", cfg.params, "at least one key not fixed by an override")

    # Fail before any worker starts: one trial's config must compose and validate.
    probe = TrainJob.from_config(compose(conf_dir, [*fixed, *(d.probe() for d in space)])[0])
    for split in ("train", "val", "test"):
        path = Path(probe.paths.processed) / f"{split}.npz"
        if not path.is_file():
            raise DataError(
                f"{path}: not found (run the preprocess stage first: dvc repro preprocess)"
            )

    url = storage_url(cfg)
    study = open_study(cfg)
    search = json.loads(
        json.dumps(
            {"space": {d.key: d.spec for d in space}, "overrides": fixed, "metric": cfg.metric}
        )
    )
    stored = study.user_attrs.get(SEARCH_ATTR)
    if stored is None:
        study.set_user_attr(SEARCH_ATTR, search)
    elif stored != search:
        raise PipelineError(
            f"study '{cfg.name}' in {public_url(url)} was started with another search "
            f"({json.dumps(stored)}); rerun it with the same space and overrides, or name a "
            f"new study: sweep.name=<new name>"
        )

    experiment_id = store.connect(tracking_cfg)
    tags = {STUDY_TAG: cfg.name, "sweep.storage": public_url(url)}
    # One parent run per study, whichever machine starts first: the others join it.
    with storage_lock(url, f"parent-{cfg.name}"):
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent and not runs.live_run_exists(parent):
            raise PipelineError(
                f"study '{cfg.name}' logs to MLflow run {parent}, which is not "
                f"in the tracking store {store.tracking_uri(tracking_cfg)}; "
                "point MLFLOW_TRACKING_URI at that store or name a new study"
            )
        created = parent is None
        if created:
            parent = runs.create(experiment_id, run_name=f"sweep-{cfg.name}", tags=tags)
            study.set_user_attr(PARENT_ATTR, parent)
    started = time.perf_counter()
    with (
        sigterm_interrupts(),
        runs.run(experiment_id, resume_run_id=parent, tags=tags) as parent_run_id,
    ):
        if created:
            runs.log_params(
                {
                    "sweep.name": cfg.name,
                    "sweep.metric": cfg.metric,
                    "sweep.direction": cfg.direction,
                    "sweep.overrides": " ".join(fixed) or "-",
                    **{f"sweep.space.{d.key}": d.spec for d in space},
                }
            )
        runs.set_tags(
            {
                "sweep.sampler": cfg.sampler.name,
                "sweep.pruner": cfg.pruner.name,
                "sweep.n_jobs": cfg.n_jobs,
            },
            run_id=parent_run_id,
        )

        before = progress(study)
        n_workers = min(cfg.n_jobs, before.remaining(cfg.n_trials) + before.running)
        threads = max(1, startup.cores() // cfg.n_jobs)
        plan = (
            f"{n_workers} worker process(es) with {threads} TensorFlow thread(s) each"
            if n_workers
            else "nothing left to run"
        )
        print(
            f"sweep: study '{cfg.name}' in {public_url(url)}: {before.done} of {cfg.n_trials} "
            f"trials done; {plan}; parent MLflow run {parent_run_id}",
            flush=True,
        )
        trials_before = len(study.get_trials(deepcopy=False))
        plans = [
            Plan(
                sweep=cfg,
                conf_dir=str(conf_dir),
                space=tuple(space),
                overrides=(f"runtime.intra_op_threads={threads}", *fixed),
                parent_run_id=parent_run_id,
                worker=index,
                seed=worker_seed(cfg.sampler.seed, index, trials_before),
            )
            for index in range(n_workers)
        ]
        exit_codes = run_workers(plans)

        after = progress(study)
        summary = summarize(study, cfg, conf_dir, fixed, parent_run_id)
        summary.ran, summary.workers = after.done - before.done, n_workers
        summary.wall_s = time.perf_counter() - started
        crashed = [plan.worker for plan, code in zip(plans, exit_codes, strict=True) if code]
        if crashed:
            raise PipelineError(
                f"worker(s) {crashed} stopped with an error (see above); "
                "rerun the same command to continue the study"
            )
        if summary.best_value is None:
            raise PipelineError(
                f"no trial of '{cfg.name}' completed ({summary.pruned} pruned, "
                f"{summary.failed} failed): nothing to write; relax the pruner, "
                "change the space or raise sweep.n_trials"
            )
    return summary
