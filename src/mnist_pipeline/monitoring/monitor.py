"""One check of production traffic: the newest windows of the request log against the served
version's reference.

For each window (`window` consecutive answers of one version): the drift tests
(`drift.compare`) and the estimated accuracy (`estimate`, ATC by default, with CBPE beside
it). The estimate is trusted only as far as the traffic resembles the reference: when inputs
drift, a temperature fitted on clean digits says less about the answers, and the window says
so (`Checked.caveat`).

`mnist-pipeline monitor` (cli.py) runs `check`, logs each window as a run of the `monitoring`
experiment (tracking/monitor_runs.py), writes the HTML report (report.py) and exits
`ALARM_EXIT` when any window raised an alarm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from . import drift, estimate
from .estimate import Estimate
from .requestlog import RequestLog, Window, display, split

ALARM_EXIT = 3  # 0: no alarm; 1: could not check (an error); 3: drift in a window checked


@dataclass(frozen=True)
class Checked:
    window: Window
    drift: drift.Drift
    estimate: Estimate  # the configured estimator's
    cbpe: Estimate  # mean confidence, for comparison
    reference_accuracy: float

    @property
    def key(self) -> str:
        """What names this window in MLflow: model, version and the log ids it spans."""
        return (
            f"{self.window.model}/v{self.window.version}/"
            f"{self.window.first_id}-{self.window.last_id}"
        )

    @property
    def caveat(self) -> str:
        """Why the estimate may be off, or '' when nothing drifted."""
        if not self.drift.alarm:
            return ""
        fired = ", ".join(name.removeprefix("input:") for name in self.drift.fired)
        return (
            f"drift in {fired}: the calibration was fitted on clean digits, so under drift "
            "the estimate is a rough guide, most often too high (a model can be "
            "confidently wrong on inputs it never saw)"
        )

    def line(self) -> str:
        e = self.estimate
        verdict = ("ALARM: " + ", ".join(self.drift.fired)) if self.drift.alarm else "ok"
        return (
            f"v{self.window.version} requests {self.window.first_id}-"
            f"{self.window.last_id}: estimated accuracy {e.accuracy:.3f} "
            f"[{e.low:.3f}, {e.high:.3f}] ({e.method}; reference "
            f"{self.reference_accuracy:.3f}), unsure {self.unsure_rate:.1%}; {verdict}"
        )

    @property
    def unsure_rate(self) -> float:
        return float(self.window.unsure.mean()) if len(self.window) else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the window's MLflow run."""
        out = {
            "estimated_accuracy": self.estimate.accuracy,
            "estimated_accuracy_low": self.estimate.low,
            "estimated_accuracy_high": self.estimate.high,
            "cbpe_accuracy": self.cbpe.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "alarm": float(self.drift.alarm),
            "tests_fired": float(len(self.drift.fired)),
            "unsure_rate": self.unsure_rate,
            "mean_confidence": float(np.mean(self.window.outputs.confidence)),
            "requests": float(len(self.window)),
        }
        for test in self.drift.tests:
            name = test.name.replace(":", "_")
            out[f"p_{name}"] = test.p_value
            out[f"shift_{name}"] = test.shift
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.window.model,
            "version": self.window.version,
            "first_id": self.window.first_id,
            "last_id": self.window.last_id,
            "first_time": float(self.window.times[0]),
            "last_time": float(self.window.times[-1]),
            "estimate": self.estimate.as_dict(),
            "cbpe": self.cbpe.as_dict(),
            "reference_accuracy": self.reference_accuracy,
            "caveat": self.caveat,
            "unsure_rate": self.unsure_rate,
            **self.drift.as_dict(),
        }


def check_window(
    window: Window, reference: drift.Reference, *, alpha: float, method: str, min_distance: float
) -> Checked:
    """The drift tests and the accuracy estimate of one window."""
    return Checked(
        window=window,
        drift=drift.compare(reference, window.outputs, alpha, min_distance=min_distance),
        estimate=estimate.estimate(reference, window.outputs.confidence, method),
        cbpe=estimate.mean_confidence(window.outputs.confidence),
        reference_accuracy=reference.accuracy,
    )


def newest_windows(
    log: RequestLog, size: int, count: int, *, model: str | None = None, version: str | None = None
) -> list[Window]:
    """The newest `count` complete windows of `size` answers of one version (the version of
    the newest row unless given), oldest first; fewer if the log holds fewer."""
    if model is None or version is None:
        latest = log.latest_version()
        if latest is None:
            raise DataError(
                f"request log {display(log.url)}: no answers logged yet; the "
                "model server logs each one it answers (make serve)"
            )
        model, version = model or latest[0], version or latest[1]
    rows = log.rows(model, version, newest=size * count)
    return split(rows, size)
