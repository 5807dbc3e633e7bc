"""The MLflow UI on the repository's store: its command line, Host-header refusal, and a
real headless Chromium finding the pipeline's runs, sweep, plots and champion."""

from __future__ import annotations

import http.client
import os
import sys

import pytest
from helpers import config as test_config
from helpers import tiny_store
from helpers.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PAGE_TIMEOUT_MS,
    close_assistant_panel,
    save_screenshot,
)

from mnist_pipeline.errors import ServerError
from mnist_pipeline.serve import ui


# --- the command line (no server) ----------------------------------------------------------


def test_command_serves_the_repository_store_on_loopback_with_one_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    command = ui.server_command(test_config.section("tracking"), port=5123)
    argv = command.argv
    assert argv[:4] == [sys.executable, "-m", "mlflow", "server"]

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert option("--backend-store-uri") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert option("--artifacts-destination") == str(tmp_path / "mlartifacts")
    assert option("--host") == "127.0.0.1"
    assert option("--port") == "5123"
    assert option("--workers") == "1"
    assert option("--allowed-hosts").split(",") == ["127.0.0.1:5123", "localhost:5123"]
    assert not any(o in argv for o in ("--gunicorn-opts", "--waitress-opts"))  # uvicorn
    assert command.url == "http://127.0.0.1:5123" and not command.warnings
    assert command.env_overrides["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert command.shell().startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ")


def test_tracking_uri_override_is_the_store_served(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team.db'}")
    argv = ui.server_command(test_config.section("tracking")).argv
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'team.db'}"
    # runs logged through the UI server keep their artifacts where the pipeline puts them
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")


def test_binding_beyond_loopback_is_explicit_and_warned():
    command = ui.server_command(
        test_config.section("tracking"), host="0.0.0.0", port=5000, extra_hosts=("mlflow.lan:5000",)
    )
    assert command.argv[command.argv.index("--host") + 1] == "0.0.0.0"
    assert (
        command.argv[command.argv.index("--allowed-hosts") + 1]
        == "127.0.0.1:5000,localhost:5000,mlflow.lan:5000"
    )
    assert any("exposes this server" in w for w in command.warnings)
    assert command.url == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"extra_hosts": ("*",)}, "would accept any Host header"),
        ({"port": 0}, "--port: got 0"),
        ({"workers": 0}, "--workers: got 0"),
    ],
)
def test_unsafe_or_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ServerError, match=message):
        ui.server_command(test_config.section("tracking"), **kwargs)


def test_a_remote_tracking_server_is_not_wrapped(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.com")
    with pytest.raises(ServerError, match="already a server"):
        ui.server_command(test_config.section("tracking"))


# --- the real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tiny_store.Store:
    return tiny_store.build(tmp_path_factory.mktemp("ui-repo"), tiny_store.synthetic_splits())


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    """The UI server started through `ui`, as `make ui` starts it."""
    log = tmp_path_factory.mktemp("ui-log") / "server.log"
    with tiny_store.server(store, lambda cfg, port: ui.server_command(cfg, port=port), log) as (
        command,
        port,
    ):
        yield command.url, port


def get(port: int, path: str, host: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=True)
        connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/2.0/mlflow/experiments/search?max_results=5",
        "/ajax-api/2.0/mlflow/registered-models/search",
    ],
)
def test_foreign_host_header_is_refused(server, path):
    _, port = server
    for host in ("evil.example.com", f"evil.example.com:{port}", "127.0.0.1:1"):
        status, body = get(port, path, host)
        assert status == 403, (host, status, body[:200])
        assert b"Invalid Host header" in body
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert get(port, path, host)[0] == 200


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason=f"{CHROMIUM} is missing (make system-deps installs Debian's chromium)",
)
def test_browser_finds_runs_sweep_plots_and_champion(server, store, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, port = server
    experiment = f"{url}/#/experiments/{store.experiment_id}"
    run_page = f"{experiment}/runs/{store.run_id}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            expect.set_options(timeout=PAGE_TIMEOUT_MS)

            # The experiment list, then the experiment's runs: the training run and the sweep.
            page.goto(f"{url}/#/experiments", wait_until="domcontentloaded")
            expect(page.get_by_role("link", name="mnist", exact=True)).to_be_visible()
            page.goto(
                f"{experiment}/runs?workflowType=machine_learning", wait_until="domcontentloaded"
            )
            expect(page.get_by_role("link", name=store.run_name, exact=True)).to_be_visible()
            parent = page.locator('[role="row"]', has_text="sweep-parent")
            expect(parent).to_be_visible()
            close_assistant_panel(page)
            # The sweep's trials are nested under the parent: expand it.
            parent.locator('[col-id="attributes.`Run Name`"] button').first.click()
            for trial in tiny_store.TRIALS:
                expect(page.get_by_role("link", name=trial, exact=True)).to_be_visible()
            save_screenshot(page, tmp_path, "runs")

            # The training run: its metrics (training and test) and its parameters.
            page.goto(run_page, wait_until="domcontentloaded")
            for metric in ("final_val_accuracy", "test_accuracy", "test_macro_f1"):
                expect(page.get_by_text(metric, exact=True).first).to_be_visible()
            expect(page.get_by_text("model.hidden_units", exact=True)).to_be_visible()
            save_screenshot(page, tmp_path, "run")

            # Per-epoch metric charts (drawn lazily: search brings the wanted ones first).
            page.goto(f"{run_page}/model-metrics", wait_until="domcontentloaded")
            # One search per chart: "accuracy" alone also matches the evaluation's many
            # accuracy metrics (per corruption), which would push a chart out of view.
            for chart in ("accuracy", "val_accuracy"):
                page.get_by_placeholder("Search metric charts").fill(chart)
                expect(page.get_by_text(chart, exact=True).first).to_be_visible()
            expect(page.get_by_text("Step").first).to_be_visible()  # a line chart's x axis
            save_screenshot(page, tmp_path, "metrics")

            # Artifacts: the training-curve plot renders, the evaluation folder is there.
            page.goto(f"{run_page}/artifacts", wait_until="domcontentloaded")
            expect(page.get_by_text("evaluation", exact=True).first).to_be_visible()
            page.get_by_text("training_curves.png", exact=True).first.click()
            image = page.locator('img[src^="blob:"]').first
            expect(image).to_be_visible()
            assert image.evaluate("img => img.complete && img.naturalWidth") > 100
            save_screenshot(page, tmp_path, "artifacts")

            # The registry: the model with its version holding the `champion` alias.
            page.goto(
                f"{url}/#/models/{store.tracking.registered_model}", wait_until="domcontentloaded"
            )
            expect(page.get_by_role("link", name=f"Version {store.version}")).to_be_visible()
            expect(page.get_by_text("champion").first).to_be_visible()
            save_screenshot(page, tmp_path, "model")
        finally:
            browser.close()
    assert get(port, "/", "evil.example.com")[0] == 403  # what the browser saw is loopback-only
    assert sorted(p.name for p in tmp_path.glob("ui-*.png")) == [
        "ui-artifacts.png",
        "ui-metrics.png",
        "ui-model.png",
        "ui-run.png",
        "ui-runs.png",
    ]
