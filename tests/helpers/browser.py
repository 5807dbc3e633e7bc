"""Headless Chromium for the UI tests: where it is, how it starts, and its screenshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT_ENV = "MNIST_SCREENSHOT_DIR"
PAGE_TIMEOUT_MS = 120_000  # a React app on two busy cores
MISSING = f"{CHROMIUM} is missing (make system-deps installs Debian's chromium)"


def available() -> bool:
    return CHROMIUM.exists() or bool(os.environ.get("CI"))


def close_assistant_panel(page) -> None:
    """Close MLflow 3's assistant side panel (it would cover a third of every screenshot);
    the browser remembers that for the pages opened after. Not part of what is tested."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    close = page.get_by_role("button", name="Close", exact=True).first
    try:
        close.wait_for(state="visible", timeout=15_000)
    except PlaywrightTimeout:
        return  # no panel in this version or layout
    close.click()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    """`ui-<name>.png` in `tmp_path`, copied to $MNIST_SCREENSHOT_DIR when that is set."""
    path = tmp_path / f"ui-{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get(SCREENSHOT_ENV):
        folder = Path(os.environ[SCREENSHOT_ENV])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / path.name)
    return path
