"""Write .dvc/plots.html: the page `dvc plots show` fills, with vega, vega-lite and vega-embed
inlined, so the interactive plots draw with no network.

DVC's own page loads those three libraries from cdn.jsdelivr.net, and offline its plots are
blank. This page has no `{scripts}` placeholder, so DVC never adds the CDN tags, and
`.dvc/config` names it (`plots.html_template = plots.html`, relative to `.dvc/`):

    python scripts/plots_template.py        # or: make plots-template

Each package is `npm pack`ed at the version dvc-render puts in its CDN tags; the tarball must
have the npm registry's sha512 `dist.integrity`, and its minified browser build the SHA-256
pinned below, before a byte of it is used. Nothing else varies, so two runs write identical
files; tests/pipeline/test_plots_offline.py checks the committed page against these pins.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_pipeline import files
from mnist_pipeline.config import FetchConfig, NpmMirror, build
from mnist_pipeline.data.npm import NpmTarballs, tar_member_chunks
from mnist_pipeline.errors import MirrorError, PipelineError

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / ".dvc" / "plots.html"
MEMBER_PREFIX = "package/"  # npm tarballs hold the package under package/
LICENSE = "LICENSE"


@dataclass(frozen=True)
class Bundle:
    """One npm package's minified browser build, pinned twice over."""

    package: str
    version: str
    member: str  # the browser build, relative to the package root
    sha512: str  # of the tarball, base64: the npm registry's `dist.integrity` is sha512-<this>
    sha256: str  # of `member`, which the page embeds byte for byte

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def integrity(self) -> str:
        return f"sha512-{self.sha512}"


# The versions dvc-render's VegaRenderer.SCRIPTS loads from the CDN, in the order it loads
# them (vega-lite and vega-embed expect the ones before as globals).
BUNDLES = (
    Bundle(
        "vega",
        "5.20.2",
        "build/vega.min.js",
        "qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be",
    ),
    Bundle(
        "vega-lite",
        "5.2.0",
        "build/vega-lite.min.js",
        "Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb",
    ),
    Bundle(
        "vega-embed",
        "6.18.2",
        "build/vega-embed.min.js",
        "wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e",
    ),
)

# The npm reader's caps: the largest tarball is 3.7 MB and its largest member (a source map)
# 2.1 MB. The http timeouts are required by the schema but unused: every mirror is npm.
LIMITS = {
    "connect_timeout_s": 10.0,
    "read_timeout_s": 30.0,
    "max_download_bytes": 16_000_000,
    "max_file_bytes": 8_000_000,
    "npm_timeout_s": 300.0,
}

# What DVC replaces in the page (dvc_render.html.HTML.embed, with str.replace): each must be
# there once and nowhere inside the libraries, and `{scripts}` not at all.
PLACEHOLDERS = ("{refresh_tag}", "{plot_divs}")
NO_CDN = "{scripts}"
# Text that would end an inline <script> (or open an escaped block in it) or a comment early.
UNSAFE_IN_SCRIPT = re.compile(r"</script|<!--", re.IGNORECASE)
UNSAFE_IN_COMMENT = re.compile(r"--|<!-")

PAGE = """<!DOCTYPE html>
<!--
The page `dvc plots show` fills (plots.html_template in .dvc/config), with the plot libraries
inlined so the plots draw with no network; DVC's own page loads them from cdn.jsdelivr.net.
Written by scripts/plots_template.py (make plots-template): do not edit by hand.

{packages}

{licenses}
-->
<html lang="en">
<head>
<meta charset="utf-8">
{{refresh_tag}}
<title>mnist-pipeline: DVC plots</title>
<style>
table {{ border-spacing: 15px; }}
</style>
{scripts}
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


# --- reading the packages ------------------------------------------------------------------


def fetch_config() -> FetchConfig:
    """The three packages as npm mirrors, and each build's SHA-256 under its file name."""
    raw = {
        "mirrors": [
            {"name": b.package, "kind": "npm", "package": b.spec, "member_prefix": MEMBER_PREFIX}
            for b in BUNDLES
        ],
        "files": {Path(b.member).name: b.sha256 for b in BUNDLES},
        **LIMITS,
    }
    return build(FetchConfig, raw, "plots_template")


def integrity(tarball: Path) -> str:
    """The tarball's digest as npm writes `dist.integrity` (Subresource Integrity, sha512)."""
    digest = hashlib.sha512(tarball.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode("ascii")


def read_member(tarball: Path, name: str, max_bytes: int) -> bytes:
    return b"".join(tar_member_chunks(tarball, MEMBER_PREFIX + name, max_bytes=max_bytes))


def read_bundles(log: Callable[[str], None] = print) -> list[tuple[Bundle, str, str]]:
    """`(bundle, script, license)` for each bundle, every pin checked; raises `MirrorError`."""
    cfg = fetch_config()
    mirrors: dict[str, NpmMirror] = {m.name: m for m in cfg.mirrors if isinstance(m, NpmMirror)}
    out = []
    with NpmTarballs(cfg, log) as tarballs:
        for bundle in BUNDLES:
            tarball = tarballs.get(mirrors[bundle.package])
            got = integrity(tarball)
            if got != bundle.integrity:
                raise MirrorError(
                    f"{bundle.spec}: tarball integrity {got}, expected {bundle.integrity}"
                )
            script = read_member(tarball, bundle.member, cfg.max_file_bytes)
            got = hashlib.sha256(script).hexdigest()
            if got != bundle.sha256:
                raise MirrorError(
                    f"{bundle.spec} {bundle.member}: sha256 {got}, expected {bundle.sha256}"
                )
            license_text = read_member(tarball, LICENSE, cfg.max_file_bytes)
            out.append((bundle, script.decode("utf-8"), license_text.decode("utf-8")))
    return out


# --- the page ------------------------------------------------------------------------------


def render(parts: list[tuple[Bundle, str, str]]) -> str:
    """The page, with each build inlined byte for byte; raises `ValueError` if one cannot be."""
    packages = "\n".join(
        f"{b.package} {b.version}: {MEMBER_PREFIX}{b.member}, sha256 {b.sha256}\n"
        f"    from the npm tarball {b.integrity}"
        for b, _, _ in parts
    )
    licenses = "\n\n".join(
        f"{b.package} {b.version}, {MEMBER_PREFIX}{LICENSE}:\n\n{text.strip()}"
        for b, _, text in parts
    )
    for b, script, text in parts:
        if UNSAFE_IN_SCRIPT.search(script):
            raise ValueError(f"{b.spec} {b.member} holds '</script' or '<!--': cannot inline it")
        if UNSAFE_IN_COMMENT.search(text) or "\r" in text:
            raise ValueError(f"{b.spec} {LICENSE} holds '--', '<!-' or CR: cannot quote it")
        for placeholder in (*PLACEHOLDERS, NO_CDN):
            if placeholder in script or placeholder in text:
                raise ValueError(f"{b.spec} holds DVC's placeholder {placeholder}")
    scripts = "\n".join(f"<script>{script}</script>" for _, script, _ in parts)
    page = PAGE.format(packages=packages, licenses=licenses, scripts=scripts)
    for placeholder in PLACEHOLDERS:
        if page.count(placeholder) != 1:
            raise ValueError(f"the page holds {placeholder} {page.count(placeholder)} times")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TARGET, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        page = render(read_bundles(log=lambda line: print(line, file=sys.stderr)))
    except (PipelineError, ValueError) as err:
        print(f"plots-template: {err}", file=sys.stderr)
        return 1
    data = page.encode("utf-8")
    files.write_bytes(args.out, data)
    versions = ", ".join(f"{b.package} {b.version}" for b in BUNDLES)
    print(f"plots-template: wrote {args.out} ({len(data):,} bytes; {versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
