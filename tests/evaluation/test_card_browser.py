"""The model card as people open it: from the MLflow UI's artifact view of the training run,
in a real headless Chromium, with its pictures drawn from inside the page."""

from __future__ import annotations

import pytest
from helpers import browser, tiny_store

from mnist_pipeline.serve import ui

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not browser.available(), reason=browser.MISSING),
]


def test_the_card_opens_from_the_run_artifacts_in_the_mlflow_ui(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    store = tiny_store.build(tmp_path / "repo", tiny_store.synthetic_splits())
    with (
        tiny_store.server(
            store, lambda cfg, port: ui.server_command(cfg, port=port), tmp_path / "server.log"
        ) as (command, _),
        sync_playwright() as playwright,
    ):
        chromium = playwright.chromium.launch(
            executable_path=str(browser.CHROMIUM), args=browser.CHROMIUM_ARGS, headless=True
        )
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(browser.PAGE_TIMEOUT_MS)
            expect.set_options(timeout=browser.PAGE_TIMEOUT_MS)
            page.goto(
                f"{command.url}/#/experiments/{store.experiment_id}/runs/{store.run_id}/artifacts",
                wait_until="domcontentloaded",
            )
            browser.close_assistant_panel(page)
            page.get_by_text("evaluation", exact=True).first.click()
            page.get_by_text("model_card.html", exact=True).first.click()
            card = page.frame_locator("iframe.mlflow-html-iframe")
            expect(
                card.get_by_role("heading", name=f"Model card: mnist-classifier v{store.version}")
            ).to_be_visible()
            expect(card.get_by_role("heading", name="Intended use and limits")).to_be_visible()
            picture = card.locator('img[alt="Confusion matrix (test set)"]')
            picture.scroll_into_view_if_needed()
            # Drawn from its data URI inside the sandboxed page: nothing else to fetch.
            assert picture.evaluate("img => img.complete && img.naturalWidth") > 100
            card.get_by_role(
                "heading", name=f"Model card: mnist-classifier v{store.version}"
            ).scroll_into_view_if_needed()
            shot = browser.save_screenshot(page, tmp_path, "model-card")
        finally:
            chromium.close()
    assert shot.stat().st_size > 10_000
