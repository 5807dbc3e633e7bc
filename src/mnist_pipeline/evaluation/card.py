"""A model card for each registered version: what it is, what it saw, how well it does (with
95% confidence intervals), what the gate decided, and what it is for.

`build` turns what evaluate knows into a list of blocks (headings, paragraphs, tables,
pictures); the same blocks render as Markdown (pictures by file name, beside the card) and
as one self-contained HTML page (pictures embedded as base64 data URIs, styles inline), so
the HTML opens from the MLflow UI's artifact view, or from a mail, with nothing missing.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from ..files import write_text
from ..tracking import runs
from ..tracking.registry import label
from .reuse import Budget
from .robustness import Confidence, Shift
from .scores import Scores, p_text, wilson_interval

CARD_MD = "model_card.md"
CARD_HTML = "model_card.html"
CONFIG_SECTIONS = ("model.", "optimizer.", "train.")
WEAKEST = 3  # classes named under the limits
# Which corruptions of the suite each kind of training augmentation resembles (none of them
# is one of the suite's corruptions: training never sees the suite's functions or images).
RESEMBLES = {
    "translate": "translate",
    "rotate": "rotate",
    "zoom": "scale",
    "shear": "shear",
    "noise": "shot noise and impulse noise",
    "blur": "glass blur and motion blur",
    "contrast": "brightness and fog",
    "erase": "spatter, stripe and dotted line (patches of one grey or of random pixels)",
}

Block = tuple  # ("h1"|"h2"|"p", text) | ("table", header, rows) | ("img", alt, path)


@dataclass(frozen=True)
class Facts:
    """What the evaluate stage knows when it writes the card."""

    registered_model: str
    version: str
    run_id: str
    params: Mapping[str, str]  # the training run's params (model.*, optimizer.*, train.*)
    tags: Mapping[str, str]  # the training run's tags: data hashes, dvc.lock, git
    scores: Scores
    shift: Shift  # the corrupted suite, calibration and abstention
    champion_corrupted: Mapping[str, float] | None  # the champion's accuracy per corruption
    budget: Budget  # the decisions made on this test set before this one
    served_bytes: float | None  # the size of the served ONNX export (the run's onnx_bytes)
    test_sha256: str
    verdict: Mapping[str, Any]  # gate.Verdict.to_dict()
    champion_before: str | None
    champion_after: str | None
    pictures: Mapping[str, Path]  # caption -> PNG
    int8_bytes: float | None = None  # the size of its int8 graph, if made (onnx_int8_bytes)


def write(folder: str | Path, facts: Facts) -> list[Path]:
    """`model_card.md` and `model_card.html` in `folder` (atomically); returns their paths."""
    blocks = build(facts)
    md, page = Path(folder) / CARD_MD, Path(folder) / CARD_HTML
    write_text(md, markdown(blocks))
    write_text(page, html_page(blocks))
    return [md, page]


def title(facts: Facts) -> str:
    return f"Model card: {facts.registered_model} v{facts.version}"


def build(facts: Facts) -> list[Block]:
    s = facts.scores
    n = len(s.correct)
    low, high = wilson_interval(int(np.count_nonzero(s.correct)), n)
    verdict = facts.verdict
    blocks: list[Block] = [
        ("h1", title(facts)),
        (
            "p",
            f"Training run {facts.run_id}. Registered as version {facts.version} of "
            f"{facts.registered_model}; champion {label(facts.champion_before)} before this "
            f"evaluation, {label(facts.champion_after)} after it. Gate: "
            f"{'PASSED' if verdict['passed'] else 'REJECTED'}.",
        ),
        ("h2", "Test metrics, with 95% confidence intervals"),
        (
            "p",
            f"Accuracy {s.accuracy:.4f} (95% CI {low:.4f}–{high:.4f}, Wilson score "
            f"interval) on {n} test images; loss {s.loss:.4f}; macro F1 {s.macro_f1:.4f}.",
        ),
        ("table", ("class", "recall", "95% CI", "test images"), _recall_rows(s)),
        ("h2", "Intended use and limits"),
        *[("p", text) for text in _limits(s)],
        *[("p", text) for text in _shift_limits(facts)],
        *_robustness(facts),
        *_calibration(facts.shift),
        *_served(facts),
        ("h2", "Gate verdict"),
        (
            "p",
            f"{'PASSED' if verdict['passed'] else 'REJECTED'}: {verdict['reason']}. "
            f"Significance test p-value: {_p(verdict.get('p_value'))} (the `significant` "
            f"rule below says which test). {_reuse(verdict, facts.budget)}",
        ),
        (
            "table",
            ("rule", "passed", "value", "threshold", "detail"),
            [
                (
                    r["name"],
                    "yes" if r["passed"] else "NO",
                    _value(r["value"]),
                    _value(r["threshold"]),
                    r["detail"],
                )
                for r in verdict["rules"]
            ],
        ),
        ("h2", "What the model is"),
        (
            "table",
            ("setting", "value"),
            [
                (key, value)
                for key, value in sorted(facts.params.items())
                if key.startswith(CONFIG_SECTIONS)
            ],
        ),
        ("h2", "The data it saw"),
        ("table", ("what", "value"), _lineage(facts)),
        ("h2", "Pictures"),
        *[("img", caption, path) for caption, path in facts.pictures.items()],
    ]
    return blocks


def _robustness(facts: Facts) -> list[Block]:
    shift, champion = facts.shift, facts.champion_corrupted
    worst, worst_accuracy = shift.worst
    rows = []
    for name, value in shift.accuracy.items():
        theirs = None if champion is None else champion.get(name)
        rows.append(
            (
                name.replace("_", " "),
                f"{value:.4f}",
                "" if theirs is None else f"{theirs:.4f}",
                "" if theirs is None else f"{value - theirs:+.4f}",
            )
        )
    versus = ""
    if champion:
        theirs = float(np.mean(list(champion.values())))
        versus = f" (the champion before this evaluation: {theirs:.4f})"
    return [
        ("h2", "Robustness: the corrupted test suite"),
        (
            "p",
            f"Mean corruption accuracy {shift.mean_accuracy:.4f}{versus} over the "
            f"{len(shift.names)} corruptions of MNIST-C (Mu & Gilmer 2019), each applied "
            f"to all {shift.correct.shape[1]} test images at the benchmark's severity; worst: "
            f"{worst.replace('_', ' ')} ({worst_accuracy:.4f}). Suite SHA-256 "
            f"{shift.suite_sha256[:12]}…; never trained on.",
        ),
        ("table", ("corruption", "accuracy", "champion", "difference"), rows),
    ]


def _calibration(shift: Shift) -> list[Block]:
    fitted = shift.calibration
    if fitted.val_images:
        how = (
            f"Temperature {fitted.temperature:.4g}, fitted on the {fitted.val_images} "
            "validation images (never the test set): served probabilities are "
            f"softmax(log p / {fitted.temperature:.4g})."
        )
        abstain = (
            f"Answers whose calibrated confidence is below {fitted.threshold:.4f} are "
            "marked unsure (they are still given): the lowest threshold at which the "
            "answered validation images reached the target selective accuracy of "
            f"{fitted.target_selective_accuracy:.4g} ({fitted.val_coverage:.4f} of them "
            "answered)."
        )
    else:
        how = (
            "No calibration was fitted for this model (trained before calibration was "
            "part of training): its raw softmax probabilities are served."
        )
        abstain = "No abstention threshold: every answer stands."

    def row(label: str, c: Confidence) -> tuple[str, ...]:
        return (
            label,
            f"{c.nll_raw:.4f}",
            f"{c.nll:.4f}",
            f"{c.brier_raw:.4f}",
            f"{c.brier:.4f}",
            f"{c.ece_raw:.4f}",
            f"{c.ece:.4f}",
        )

    def answered(label: str, c: Confidence) -> tuple[str, ...]:
        return (label, f"{c.coverage:.4f}", _fmt(c.selective_accuracy))

    return [
        ("h2", "Calibration"),
        ("p", how + " ECE: expected calibration error over 15 equal-width confidence bins."),
        (
            "table",
            (
                "images",
                "NLL",
                "NLL calibrated",
                "Brier",
                "Brier calibrated",
                "ECE",
                "ECE calibrated",
            ),
            [row("clean test set", shift.clean), row("corrupted suite", shift.corrupted)],
        ),
        ("h2", "Abstention"),
        ("p", abstain),
        (
            "table",
            ("images", "coverage (answered)", "accuracy on the answered"),
            [answered("clean test set", shift.clean), answered("corrupted suite", shift.corrupted)],
        ),
    ]


def _served(facts: Facts) -> list[Block]:
    """What `make serve` and `mnist-predict` run, and the gate's proof that it is this model."""
    rule = next((r for r in facts.verdict["rules"] if r["name"] == "served_parity"), None)
    size = f" ({facts.served_bytes / 1e6:.2f} MB)" if facts.served_bytes else ""
    int8 = (
        f" Its int8 graph ({facts.int8_bytes / 1e6:.2f} MB) is what `make serve ARGS=--int8` runs, "
        "when the figures below call it servable."
        if facts.int8_bytes
        else ""
    )
    proof = (
        f"Against the Keras model it was exported from, on the test images: {rule['detail']}."
        if rule
        else "Its parity with the Keras model was not checked."
    )
    return [
        ("h2", "What is served"),
        (
            "p",
            f"The model's ONNX export{size}, run by ONNX Runtime with the calibration "
            "above: the model server and mnist-predict load neither TensorFlow nor "
            f"MLflow.{int8} {proof}",
        ),
    ]


def _shift_limits(facts: Facts) -> list[str]:
    shift, params = facts.shift, facts.params
    hardest = sorted(shift.accuracy.items(), key=lambda item: item[1])[:3]
    named = ", ".join(f"{name.replace('_', ' ')} ({value:.3f})" for name, value in hardest)
    if str(params.get("train.augment", "")).lower() == "true":
        used = [(key, params.get(f"train.augmentation.{key}", "0")) for key in RESEMBLES]
        used = [(key, value) for key, value in used if _nonzero(value)]
        like = "; ".join(f"{key} {value} resembles {RESEMBLES[key]}" for key, value in used)
        trained = (
            f"Training augmented its images ({like or 'with no operation turned on'}). "
            "None of the suite's corruption functions or images was used in training."
        )
    else:
        trained = "Training used no augmentation: nothing it saw resembles the suite's corruptions."
    return [f"Shifted inputs: on the corrupted suite the model is weakest on {named}. " + trained]


def _reuse(verdict: Mapping[str, Any], budget: Budget) -> str:
    if verdict.get("decision") is None:
        return (
            "No comparison with a champion, so nothing was spent of the test set's "
            f"false-promotion budget ({budget.describe()})."
        )
    return (
        f"Decision {verdict['decision']} on this test set, tested at level "
        f"{verdict['level']:.3g}: the false-promotion rate over every decision on these "
        f"test images is held at {budget.alpha:g} (online fallback spending, docs/gate.md)."
    )


def _nonzero(value: Any) -> bool:
    try:
        return float(value) != 0
    except (TypeError, ValueError):
        return False


def _fmt(value: float) -> str:
    return "n/a (none answered)" if value != value else f"{value:.4f}"


def _lineage(facts: Facts) -> list[tuple[str, str]]:
    tags = facts.tags
    commit = tags.get(runs.GIT_COMMIT, "none recorded")
    if tags.get("git.dirty") == "true":
        commit += " (with uncommitted changes)"
    rows = [
        ("dataset SHA-256 (train, val, test)", tags.get("data.sha256", "not recorded")),
        ("test set SHA-256 (scored here)", facts.test_sha256),
        ("test set SHA-256 (at training)", tags.get("data.test_sha256", "not recorded")),
        ("git commit", commit),
        ("DVC experiment", tags.get("dvc.experiment", "none (the workspace)")),
    ]
    rows += [
        (f"dvc.lock md5 of {key.removeprefix('dvc.dep.')}", value)
        for key, value in sorted(tags.items())
        if key.startswith("dvc.dep.")
    ]
    return rows


def _recall_rows(s: Scores) -> list[tuple[str, str, str, str]]:
    rows = []
    for cls, (recall, support) in enumerate(zip(s.recall, s.support, strict=True)):
        hits = int(s.confusion[cls, cls])
        low, high = wilson_interval(hits, int(support))
        rows.append((str(cls), f"{recall:.4f}", f"{low:.4f}–{high:.4f}", str(support)))
    return rows


def _limits(s: Scores) -> list[str]:
    weakest = [
        cls
        for cls in sorted(range(len(s.recall)), key=lambda cls: s.recall[cls])
        if s.recall[cls] < 1.0
    ][:WEAKEST]
    named = (
        ", ".join(
            f"{cls} (recall {s.recall[cls]:.4f}, "
            f"{int(s.support[cls]) - int(s.confusion[cls, cls])} of {s.support[cls]} "
            "missed)"
            for cls in weakest
        )
        or "none: every class was read without a miss"
    )
    return [
        "Intended use: reading one handwritten digit, 0 to 9, from a centred 28x28 greyscale "
        "image with white ink on a black background, the way MNIST's digits are made.",
        "Photos and scans do not look like that: pass them through mnist-predict, which "
        "inverts, crops, scales to a 20x20 box and centres the digit as MNIST did, before "
        "the model sees them. The model always answers one of 0-9: it cannot say that a "
        "picture holds no digit, several digits, or a letter.",
        f"Measured weaknesses (the weakest classes on the test set): {named}. The test set "
        "is MNIST's, written by the same population as the training data; other handwriting "
        "can score lower than these intervals.",
    ]


# --- rendering -----------------------------------------------------------------------------


def markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            out.append(markdown_table(block[1], block[2]))
        elif kind == "img":
            out.append(f"![{block[1]}]({Path(block[2]).name})")
    return "\n\n".join(out) + "\n"


def html_page(blocks: Sequence[Block]) -> str:
    """One HTML page with everything inline: no link, script or picture outside it."""
    parts = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "table":
            header = "".join(f"<th>{html.escape(c)}</th>" for c in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                for row in block[2]
            )
            parts.append(f"<table><tr>{header}</tr>{rows}</table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[2]).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(block[1])}" '
                f'src="data:image/png;base64,{data}"><figcaption>'
                f"{html.escape(block[1])}</figcaption></figure>"
            )
    name = html.escape(blocks[0][1]) if blocks else "Model card"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{name}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
    "padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "img{max-width:100%}figure{margin:1em 0}"
)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: `|` in a cell escaped, a line break made a space."""
    cells = [[_md_cell(c) for c in row] for row in rows]
    return tabulate(
        cells, headers=[_md_cell(c) for c in header], tablefmt="github", disable_numparse=True
    )


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) == 64:  # a SHA-256: its head says enough
        return value[:12] + "…"
    return "" if value is None else str(value)


def _p(value: float | None) -> str:
    return "n/a (no champion to compare with)" if value is None else p_text(value, ".4g")
