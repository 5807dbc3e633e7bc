"""`dvc plots show` draws every plot with no network: the page DVC fills (.dvc/plots.html,
written by scripts/plots_template.py) carries vega, vega-lite and vega-embed itself, where
DVC's own page loads them from cdn.jsdelivr.net and shows blank plots offline."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import configobj
import pytest
import yaml
from helpers import browser, repo
from helpers.digits import ROOT
from PIL import Image

SCRIPT = ROOT / "scripts" / "plots_template.py"
DVC_CONFIG = ROOT / ".dvc" / "config"
SCRIPT_TAG = re.compile(r"<script\b([^>]*)>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
PATHS_PARAM = re.compile(r"\$\{paths\.(\w+)\}")
ROWS = 10  # of each synthetic plot file


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("plots_template", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def template_path() -> Path:
    """The page `.dvc/config` names, resolved as DVC does: relative to `.dvc/`."""
    name = configobj.ConfigObj(str(DVC_CONFIG))["plots"]["html_template"]
    return DVC_CONFIG.parent / name


# --- the committed page (no network) -------------------------------------------------------


def test_dvc_config_names_the_generated_offline_plots_template(generator):
    assert template_path() == generator.TARGET
    assert template_path().is_file(), "run `make plots-template`"


def test_offline_plots_template_inlines_the_pinned_builds_and_loads_nothing(generator):
    page = template_path().read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1
    assert page.count("{refresh_tag}") == 1
    # Where this placeholder is, DVC inserts its <script src="https://cdn.jsdelivr.net/...">.
    assert "{scripts}" not in page
    tags = SCRIPT_TAG.findall(page)
    assert [attributes.strip() for attributes, _ in tags] == [""] * len(generator.BUNDLES)
    outside_scripts = SCRIPT_TAG.sub("", page)
    assert "<script" not in outside_scripts.lower()
    assert not re.search(r"https?:", outside_scripts), "the page must not name a URL to load"
    # Each inline script is the npm build the generator pins, byte for byte, in its order.
    digests = [hashlib.sha256(body.encode("utf-8")).hexdigest() for _, body in tags]
    assert digests == [bundle.sha256 for bundle in generator.BUNDLES]
    for bundle in generator.BUNDLES:
        assert f"{bundle.package} {bundle.version}: package/{bundle.member}" in page
        assert bundle.integrity in page


def test_offline_plots_template_refuses_scripts_it_cannot_inline(generator):
    bundle = generator.BUNDLES[0]
    generator.render([(bundle, "var ok = 1;", "MIT")])  # the same parts, but harmless
    for script, text in [
        ("x = '</script>';", "MIT"),
        ("x = '<!--';", "MIT"),
        ("x = '{plot_divs}';", "MIT"),
        ("x = 1;", "see {scripts}"),
        ("x = 1;", "ends a comment -->"),
    ]:
        with pytest.raises(ValueError, match=bundle.spec):
            generator.render([(bundle, script, text)])


@pytest.mark.network
def test_offline_plots_template_is_what_the_generator_writes(generator, tmp_path):
    assert generator.main(["--out", str(tmp_path / "plots.html")]) == 0
    assert (tmp_path / "plots.html").read_bytes() == template_path().read_bytes()


# --- dvc plots show in a browser with the network cut off ----------------------------------


def stage_plots(dvc_yaml: dict, params: dict) -> list[str]:
    """The files the stages declare as plots, `${paths.*}` resolved from `params.yaml`."""
    names = [
        next(iter(out)) if isinstance(out, dict) else out
        for stage in dvc_yaml["stages"].values()
        for out in stage.get("plots", [])
    ]
    return [PATHS_PARAM.sub(lambda m: params["paths"][m[1]], name) for name in names]


def plot_files(dvc_yaml: dict, params: dict) -> dict[str, list[str]]:
    """Every file `dvc.yaml` plots (top-level and stage plots), with the columns it is read by
    (none for an image or a stage plot of its own)."""
    files: dict[str, list[str]] = {}
    for entry in dvc_yaml["plots"]:
        if isinstance(entry, str):
            files.setdefault(entry, [])
            continue
        ((_, props),) = entry.items()
        x = props.get("x")
        assert x is None or isinstance(x, str), f"per-file x is not handled here: {x!r}"
        for name, y in props["y"].items():
            wanted = files.setdefault(name, [])
            for column in ([x] if x else []) + ([y] if isinstance(y, str) else list(y)):
                if column not in wanted:
                    wanted.append(column)
    for name in stage_plots(dvc_yaml, params):
        files.setdefault(name, [])
    return files


def vega_plot_count(dvc_yaml: dict, params: dict) -> int:
    """How many plots DVC draws with vega: every plot of a data file (a stage plot on its own
    too); images become <img>."""
    named = [entry for entry in dvc_yaml["plots"] if isinstance(entry, str)]
    named += stage_plots(dvc_yaml, params)
    defined = len(dvc_yaml["plots"]) - sum(isinstance(e, str) for e in dvc_yaml["plots"])
    return defined + sum(1 for name in named if Path(name).suffix != ".png")


def write_plot_file(path: Path, columns: list[str]) -> None:
    """A small image, or a CSV of small integers (they serve as numbers and as categories)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        Image.new("L", (28, 28), 128).save(path)
        return
    assert path.suffix == ".csv", path
    columns = columns or ["step", "value"]
    rows = [
        ",".join(str((i * (k + 1) + k) % ROWS) for k in range(len(columns))) for i in range(ROWS)
    ]
    path.write_text("\n".join([",".join(columns), *rows]) + "\n")


def plots_project(path: Path) -> tuple[Path, int]:
    """A DVC repository with this project's `dvc.yaml`, `.dvc/config` and plots page, and
    synthetic data for every plot; returns it and how many plots are vega plots."""
    path.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, path / name)
    repo.run(["git", "init", "-q", "-b", "main"], path)
    repo.run(["dvc", "init", "-q"], path)
    shutil.copy2(DVC_CONFIG, path / ".dvc" / "config")
    shutil.copy2(template_path(), path / ".dvc" / template_path().name)
    dvc_yaml = yaml.safe_load((path / "dvc.yaml").read_text())
    params = yaml.safe_load((path / "params.yaml").read_text())
    for name, columns in plot_files(dvc_yaml, params).items():
        write_plot_file(path / name, columns)
    return path, vega_plot_count(dvc_yaml, params)


# DVC writes each vega plot as <div id=ID> holding a script that calls vegaEmbed('#ID', spec);
# vega-embed then replaces the script with vega's <canvas> (or <svg class="marks">).
EMBED_CALL = re.compile(r"vegaEmbed\('#([^']+)'")
PLOTS_STATE = """ids => ids.map(id => {
    const marks = document.getElementById(id)?.querySelector('canvas, svg.marks');
    const box = marks ? marks.getBoundingClientRect() : null;
    return {id: id, drawn: !!box && box.width >= 50 && box.height >= 50,
            width: box ? box.width : 0, height: box ? box.height : 0};
})"""
IMAGES_STATE = """() => [...document.images].map(
    img => ({src: img.getAttribute('src'), width: img.complete ? img.naturalWidth : 0}))"""


def open_offline(index: Path, tmp_path: Path) -> dict:
    """Open `index` in headless Chromium with every request but file:// aborted; wait until
    each vega plot is drawn (or 60 s); return the plots, images, blocked requests, errors."""
    body = index.read_text(encoding="utf-8").partition("</head>")[2]
    ids = EMBED_CALL.findall(body)
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    errors: list[str] = []

    def only_files(route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(browser.CHROMIUM), args=browser.CHROMIUM_ARGS, headless=True
        )
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.route("**/*", only_files)
            page.goto(index.as_uri(), wait_until="load", timeout=browser.PAGE_TIMEOUT_MS)
            try:
                page.wait_for_function(
                    f"ids => ({PLOTS_STATE})(ids).every(plot => plot.drawn)",
                    arg=ids,
                    timeout=60_000,
                )
            except PlaywrightTimeout:
                pass  # the assertions below say which plots stayed blank
            result = {
                "plots": page.evaluate(PLOTS_STATE, ids),
                "images": page.evaluate(IMAGES_STATE),
                "blocked": blocked,
                "errors": errors,
            }
            browser.save_screenshot(page, tmp_path, "dvc-plots-offline")
        finally:
            chromium.close()
    return result


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(600)
@pytest.mark.skipif(not browser.available(), reason=browser.MISSING)
def test_dvc_plots_show_draws_every_plot_offline(tmp_path):
    project, vega_plots = plots_project(tmp_path / "repo")
    repo.run(["dvc", "plots", "show"], project)
    index = project / "dvc_plots" / "index.html"

    seen = open_offline(index, tmp_path)

    assert vega_plots >= 7  # curves, confusion, recall, corruptions, reliability, history
    assert len(seen["plots"]) == vega_plots, seen["plots"]
    blank = [plot["id"] for plot in seen["plots"] if not plot["drawn"]]
    assert not blank, (
        f"blank plots: {blank}; blocked: {seen['blocked']}; errors: {seen['errors'][:4]}"
    )
    assert seen["blocked"] == [], "the page asked the network for these"
    assert seen["images"] and all(img["width"] > 0 for img in seen["images"]), seen["images"]
    assert seen["errors"] == []
