"""The documentation: a README a newcomer reads in minutes, links that lead somewhere, and a
fault matrix whose tests exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.digits import ROOT

README_LIMIT = 12_000  # bytes: the rest belongs in docs/
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
]
# [text](target) and ![alt](target), not inside code
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of `page`."""
    headings = re.findall(
        r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.MULTILINE
    )
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    found = links(page)
    if page == ROOT / "README.md":
        assert len(found) >= 6, found  # the pages that hold the rest
    broken = []
    for target in found:
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_test_the_fault_matrix_names_exists():
    matrix = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [line for line in matrix.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == list(range(1, 34))
    missing = []
    for row in rows:
        if row.split("|")[5].strip() == "planned":
            continue
        file = None
        for path, name in re.findall(r"`(?:(\w+/test_\w+\.py))?::(\w+)`", row.split("|")[5]):
            file = ROOT / "tests" / path if path else file
            if file is None or f"def {name}(" not in file.read_text(encoding="utf-8"):
                where = file.relative_to(ROOT) if file else "(no file named before)"
                missing.append(f"row {row.split('|')[1].strip()}: {where}::{name}")
    assert not missing, missing
