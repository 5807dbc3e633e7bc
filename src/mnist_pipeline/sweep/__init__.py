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
