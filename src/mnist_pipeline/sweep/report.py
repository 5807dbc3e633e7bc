"""What a sweep leaves: the best trial on the parent run, plots, and the experiment file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial

from ..config import SweepConfig
from ..config import compose as params
from ..config import loading as config
from ..config.compose import compose_with_choices as compose
from ..errors import ConfigError, PipelineError
from ..files import write_text
from ..tracking import runs
from .space import SEARCHED_SECTIONS
from .study import OVERRIDES_ATTR, RUN_ATTR, STATE_TAG, TRIAL_TAG, progress

# How the sweep ran its trials, not what they computed: never written to the experiment.
NOT_IN_EXPERIMENT = ("train.verbose", "train.checkpoint")


# --- the summary ---------------------------------------------------------------------------


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
        head = (
            f"sweep: {self.name}: {self.complete + self.pruned + self.failed} trials "
            f"({self.complete} complete, {self.pruned} pruned, {self.failed} failed; "
            f"{self.ran} run now in {self.wall_s / 60:.1f} min)"
        )
        if self.best_value is None:
            return f"{head}; no complete trial; parent run {self.parent_run_id}"
        return (
            f"{head}; best {self.metric} {self.best_value:.4f} (trial {self.best_trial}); "
            f"wrote {self.experiment}; parent run {self.parent_run_id}"
        )


def summarize(
    study: optuna.Study, cfg: SweepConfig, conf_dir: Path, fixed: Sequence[str], parent_run_id: str
) -> Summary:
    """Log the study's state and best trial on the parent run; write the experiment file."""
    trials = study.get_trials(deepcopy=False)
    now = progress(study)
    _tag_children(parent_run_id, {t.number: t for t in trials})
    summary = Summary(
        name=cfg.name,
        n_trials=cfg.n_trials,
        complete=now.complete,
        pruned=now.pruned,
        failed=now.failed,
        ran=0,
        workers=0,
        wall_s=0.0,
        parent_run_id=parent_run_id,
        metric=cfg.metric,
    )
    finished = now.complete + now.pruned + now.failed
    metrics: dict[str, float] = {
        "trials_complete": now.complete,
        "trials_pruned": now.pruned,
        "trials_failed": now.failed,
        "trials_target": cfg.n_trials,
    }
    if now.complete:
        best = study.best_trial
        assert best.value is not None
        summary.best_value, summary.best_trial = best.value, best.number
        summary.best_params = dict(best.params)
        metrics.update({f"best_{cfg.metric}": best.value, "best_trial": best.number})
        best_cfg, choices = compose(conf_dir, [*fixed, *best.user_attrs[OVERRIDES_ATTR]])
        header = (
            f"Best trial ({best.number}) {sweep_marker(cfg.name)}: "
            f"{cfg.metric} {best.value:.4f} on the validation split; {finished} trials: "
            f"{now.complete} complete, {now.pruned} pruned, {now.failed} failed."
        )
        summary.experiment = write_experiment(conf_dir, cfg.name, best_cfg, choices, header)
        runs.set_tags(
            {
                **{f"best.{k}": v for k, v in best.params.items()},
                "best.trial": best.number,
                "best.mlflow_run_id": best.user_attrs.get(RUN_ATTR, ""),
            },
            run_id=parent_run_id,
        )
        runs.log_text(
            json.dumps(
                {
                    "trial": best.number,
                    "value": best.value,
                    "params": best.params,
                    "overrides": best.user_attrs[OVERRIDES_ATTR],
                },
                indent=2,
            ),
            "best_params.json",
            run_id=parent_run_id,
        )
    runs.log_metrics(metrics, step=finished, run_id=parent_run_id)
    if finished:
        _log_plots(study, parent_run_id)
    return summary


def _tag_children(parent_run_id: str, trials: Mapping[int, FrozenTrial]) -> None:
    """Give every child run its trial's final state; end runs whose worker was killed."""
    for child in runs.child_runs(parent_run_id):
        number = child.data.tags.get(TRIAL_TAG, "")
        trial = trials.get(int(number)) if number.isdigit() else None
        if trial is None or not trial.state.is_finished():
            continue
        if child.info.status == "RUNNING":
            runs.end_run(child.info.run_id, "KILLED")
        if child.data.tags.get(STATE_TAG) != trial.state.name:
            runs.set_tags({STATE_TAG: trial.state.name}, run_id=child.info.run_id)


def _log_plots(study: optuna.Study, run_id: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for name, plot in (
            ("optimization_history.png", optuna_plots.plot_optimization_history),
            ("intermediate_values.png", optuna_plots.plot_intermediate_values),
        ):
            axes = plot(study)
            figure = axes.get_figure()
            assert isinstance(figure, Figure)  # a plot of its own, not a subfigure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            runs.log_figure(figure, name, run_id=run_id)
            plt.close(figure)


# --- the experiment file -------------------------------------------------------------------


def experiment_text(
    conf_dir: str | os.PathLike[str],
    name: str,
    cfg: Mapping[str, Any],
    choices: Mapping[str, str],
    header: str,
) -> str:
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
    return (
        "# @package _global_\n"
        + comment
        + "# Train it through the pipeline (the gate decides on it):\n"
        + f"#   dvc exp run -S experiment={name}\n"
        + "defaults:\n"
        + "".join(f"  - override /{g}: {o}\n" for g, o in groups.items())
        + "\n"
        + yaml.dump(body, Dumper=_ExperimentDumper, sort_keys=False)
    )


def sweep_marker(name: str) -> str:
    """The words every experiment file a sweep writes carries (in its header)."""
    return f"of the Bayesian sweep '{name}'"


def check_target(conf_dir: str | os.PathLike[str], name: str) -> Path:
    """`conf/experiment/<name>.yaml`, which sweep `name` will write; refused when it is a recipe
    kept in git that no sweep wrote (a hand-picked one), before any trial runs."""
    import subprocess

    target = Path(conf_dir) / "experiment" / f"{name}.yaml"
    if not target.is_file() or sweep_marker(name) in target.read_text(encoding="utf-8"):
        return target
    try:
        tracked = (
            subprocess.run(
                ["git", "ls-files", "--error-unmatch", target.name],
                cwd=target.parent,
                capture_output=True,
                timeout=20,
                check=False,
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        tracked = True  # cannot tell: keep the file
    if tracked:
        raise ConfigError(
            "sweep.name",
            name,
            f"a name whose experiment file is not a recipe "
            f"kept in git: {target} is one, written by hand, and the sweep would "
            f"replace it with its best trial (pick another name, e.g. "
            f"sweep.name={name}-sweep)",
        )
    return target


def write_experiment(
    conf_dir: str | os.PathLike[str],
    name: str,
    cfg: Mapping[str, Any],
    choices: Mapping[str, str],
    header: str,
) -> Path:
    """Write `conf/experiment/<name>.yaml` for `cfg`, once a copy of `conf/` proves it.

    The candidate is composed in a temporary copy of the config tree exactly as
    `dvc exp run -S experiment=<name>` will compose it; every section must validate and
    model/optimizer/train must equal `cfg`'s. Only then is the real file replaced.
    """
    text = experiment_text(conf_dir, name, cfg, choices, header)
    target = check_target(conf_dir, name)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "conf"
        shutil.copytree(conf_dir, copy)
        (copy / "experiment").mkdir(exist_ok=True)
        (copy / "experiment" / f"{name}.yaml").write_text(text, encoding="utf-8")
        composed = params.compose(copy, [f"experiment={name}"])
    for section in composed:
        if section in config.SECTION_SCHEMAS:
            config.section(composed, section)
    for section in SEARCHED_SECTIONS:
        if _trained(composed[section], section) != _trained(cfg[section], section):
            raise PipelineError(
                f"{target}: would compose to {section} "
                f"{composed[section]}, not the best trial's {cfg[section]}"
            )
    write_text(target, text)
    return target


def _difference(
    reference: Mapping[str, Any], value: Mapping[str, Any], prefix: str
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


_ExperimentDumper.add_representer(
    list,
    lambda dumper, value: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", value, flow_style=True
    ),
)


def _wrap(text: str, width: int = 88) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width)
