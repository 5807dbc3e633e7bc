"""The monitor's HTML report: one self-contained file (plots inlined as PNG), readable offline
and attachable to an alert.

It shows, over the windows checked: the estimated accuracy with its interval against the
reference accuracy, and each drift test's p-value against its level; for the newest window:
the class mix, confidence and entropy, and each input statistic against the reference.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import os
from collections.abc import Sequence

import numpy as np

from ..files import write_text
from .drift import Reference
from .features import INPUT_STATISTICS
from .monitor import Checked

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f3f3f3}td.l{text-align:left}.alarm{color:#b00;font-weight:600}
.ok{color:#070}img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}"""


def write(
    path: str | os.PathLike[str],
    checked: Sequence[Checked],
    reference: Reference,
    *,
    log: str,
    alpha: float,
) -> None:
    """Write the report for `checked` (oldest window first) to `path`, atomically."""
    write_text(path, render(checked, reference, log=log, alpha=alpha))


def render(checked: Sequence[Checked], reference: Reference, *, log: str, alpha: float) -> str:
    newest = checked[-1]
    alarms = [c for c in checked if c.drift.alarm]
    title = f"{newest.window.model} v{newest.window.version}: " + (
        f"ALARM in {len(alarms)} of {len(checked)} windows"
        if alarms
        else f"no alarm in {len(checked)} windows"
    )
    rows = "\n".join(_row(c) for c in checked)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1 class='{'alarm' if alarms else 'ok'}'>{html.escape(title)}</h1>",
        f"<p>Request log <code>{html.escape(log)}</code>; {len(newest.window)} answers per "
        f"window; reference: the version's calibrated outputs on the clean test set "
        f"({len(reference)} images, accuracy {reference.accuracy:.4f}). A window raises an "
        f"alarm when any of its {len(newest.drift.tests)} tests has p below "
        f"{newest.drift.level:.2g} (alpha {alpha:g} over the window, Bonferroni) and, for a KS "
        f"test, its distance D is at least {newest.drift.min_distance:g}. Generated "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC.</p>",
        "<table><tr><th>requests</th><th>from (UTC)</th><th>to</th><th>estimated accuracy"
        "</th><th>interval</th><th>CBPE</th><th>unsure</th><th>verdict</th><th>note</th></tr>",
        rows,
        "</table>",
        "<h2>Over the windows</h2>",
        _img(_trend(checked)),
        f"<h2>Newest window: requests {newest.window.first_id}-{newest.window.last_id}</h2>",
        _tests_table(newest),
        _img(_outputs(newest, reference)),
        _img(_inputs(newest, reference)),
        "<h2>After an alarm</h2><p>Look at what changed (the plots above; sampled pixels if "
        "<code>monitoring.image_sample_rate</code> keeps any), gather labelled digits of the "
        "new kind, add them to the data and retrain: <code>dvc exp run</code>, then the gate "
        "decides as for any candidate (docs/monitoring.md).</p></body></html>",
    ]
    return "\n".join(parts)


def _row(c: Checked) -> str:
    e, w = c.estimate, c.window
    verdict = (
        f"<span class='alarm'>ALARM: {html.escape(', '.join(c.drift.fired))}</span>"
        if c.drift.alarm
        else "<span class='ok'>ok</span>"
    )
    return (
        f"<tr><td>{w.first_id}-{w.last_id}</td><td>{_time(w.times[0])}</td>"
        f"<td>{_time(w.times[-1])}</td><td>{e.accuracy:.3f}</td>"
        f"<td>[{e.low:.3f}, {e.high:.3f}]</td><td>{c.cbpe.accuracy:.3f}</td>"
        f"<td>{c.unsure_rate:.1%}</td><td class='l'>{verdict}</td>"
        f"<td class='l'>{html.escape(c.caveat)}</td></tr>"
    )


def _tests_table(c: Checked) -> str:
    rows = "".join(
        f"<tr><td class='l'>{html.escape(t.name)}</td><td>{t.statistic:.4g}</td>"
        f"<td>{t.p_value:.3g}</td><td>{t.shift:+.4g}</td>"
        f"<td class='l'>{'<span class=alarm>fired</span>' if t.fired else ''}</td></tr>"
        for t in c.drift.tests
    )
    return (
        "<table><tr><th>test</th><th>statistic</th><th>p</th><th>shift</th><th></th>"
        f"</tr>{rows}</table>"
    )


def _time(seconds: float) -> str:
    return f"{dt.datetime.fromtimestamp(float(seconds), dt.UTC):%Y-%m-%d %H:%M:%S}"


def _img(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"<p><img src='data:image/png;base64,{encoded}'></p>"


def _figure(rows: int, cols: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def _trend(checked: Sequence[Checked]):
    figure, axes = _figure(1, 2, (12, 3.6))
    x = np.arange(len(checked))
    est = np.array([c.estimate.accuracy for c in checked])
    low = np.array([c.estimate.low for c in checked])
    high = np.array([c.estimate.high for c in checked])
    left = axes[0][0]
    left.fill_between(x, low, high, alpha=0.25, label="interval")
    left.plot(x, est, marker="o", label=f"estimated ({checked[0].estimate.method})")
    left.plot(x, [c.cbpe.accuracy for c in checked], ls=":", label="CBPE")
    left.axhline(checked[0].reference_accuracy, color="k", ls="--", lw=1, label="reference")
    for i, c in enumerate(checked):
        if c.drift.alarm:
            left.axvspan(i - 0.4, i + 0.4, color="red", alpha=0.12)
    if len(checked) <= 30:
        left.set_xticks(x)
    left.set(
        xlabel="window (oldest first; red: alarm)", ylabel="accuracy", title="Estimated accuracy"
    )
    left.legend(fontsize=8)
    right = axes[0][1]
    names = [t.name for t in checked[0].drift.tests]
    for name in names:
        p = [next(t.p_value for t in c.drift.tests if t.name == name) for c in checked]
        right.plot(x, -np.log10(np.maximum(p, 1e-300)), marker=".", label=name)
    right.axhline(
        -np.log10(checked[0].drift.level), color="red", ls="--", lw=1, label="alarm level"
    )
    if len(checked) <= 30:
        right.set_xticks(x)
    right.set(
        xlabel="window",
        ylabel="-log10 p",
        title=f"Drift tests (KS fires only with D >= {checked[0].drift.min_distance:g})",
    )
    right.legend(fontsize=6, ncol=2)
    return figure


def _outputs(c: Checked, reference: Reference):
    figure, axes = _figure(1, 3, (13, 3.2))
    window = c.window.outputs
    ref_mix = np.bincount(reference.predicted, minlength=10)[:10] / len(reference)
    win_mix = np.bincount(window.predicted, minlength=10)[:10] / len(window)
    ax = axes[0][0]
    ax.bar(np.arange(10) - 0.2, ref_mix, 0.4, label="reference")
    ax.bar(np.arange(10) + 0.2, win_mix, 0.4, label="window")
    ax.set(xticks=range(10), xlabel="predicted digit", ylabel="share", title="Class mix")
    ax.legend(fontsize=8)
    for ax, name, values, ref in (
        (axes[0][1], "confidence", window.confidence, reference.confidence),
        (axes[0][2], "entropy (nats)", window.entropy, reference.entropy),
    ):
        bins = np.linspace(0, max(1.0, float(np.max(ref)), float(np.max(values))), 31)
        ax.hist(ref, bins, density=True, alpha=0.5, label="reference")
        ax.hist(values, bins, density=True, alpha=0.5, label="window")
        ax.set(title=name.capitalize(), yscale="log")
        ax.legend(fontsize=8)
    return figure


def _inputs(c: Checked, reference: Reference):
    figure, axes = _figure(1, len(INPUT_STATISTICS), (15, 2.6))
    for i, name in enumerate(INPUT_STATISTICS):
        ax = axes[0][i]
        ref, win = reference.inputs[:, i], c.window.outputs.inputs[:, i]
        lo, hi = float(min(ref.min(), win.min())), float(max(ref.max(), win.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 26)
        ax.hist(ref, bins, density=True, alpha=0.5, label="reference")
        ax.hist(win, bins, density=True, alpha=0.5, label="window")
        fired = f"input:{name}" in c.drift.fired
        ax.set_title(
            name + (" (drift)" if fired else ""), color="#b00" if fired else "k", fontsize=9
        )
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return figure
