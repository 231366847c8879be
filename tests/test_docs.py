"""The documentation's links resolve in a clone: every relative link of README.md, docs/*.md and
bench/README.md points at a file or folder of the repository (a `#fragment` at a heading of the
target page), none leaves the repository, and the README links every page of docs/. The public
classes' and functions' docstrings (what help() shows) name every argument."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import batchless_kernels as bk

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)|<a\s[^>]*href=\"(?P<href>[^\"]+)\"")
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<target>[^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def links(page: Path) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    found = [m.group("target") or m.group("href") for m in LINK.finditer(text)]
    return found + [m.group("target") for m in IMAGE.finditer(text)]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercased, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    anchors, seen = set(), {}
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_pages_exist():
    assert (ROOT / "docs" / "method.md").exists()
    assert len(PAGES) >= 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page):
    problems = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        if path.startswith("/"):
            problems.append(f"{target}: absolute path (does not resolve in a clone)")
            continue
        resolved = (page.parent / path).resolve() if path else page
        try:
            resolved.relative_to(ROOT)
        except ValueError:
            problems.append(f"{target}: leaves the repository")
            continue
        if not resolved.exists():
            problems.append(f"{target}: no such file or folder")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md") if not EXTERNAL.match(t)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no {missing}"


def test_the_checker_sees_links_and_skips_code():
    sample = ROOT / "README.md"
    text = "see [a](docs/x.md) and `[not](a/link)`\n```\n[nor](this)\n```\n![img](y.png) [web](https://e.org)\n"
    found = [m.group("target") or m.group("href") for m in LINK.finditer(prose(text))]
    found += [m.group("target") for m in IMAGE.finditer(prose(text))]
    assert found == ["docs/x.md", "https://e.org", "y.png"]
    assert "what-and-why" in heading_anchors(sample)


@pytest.mark.parametrize("name", [n for n in bk.__all__ if inspect.isclass(getattr(bk, n)) or inspect.isfunction(getattr(bk, n))])
def test_public_docstrings_name_every_argument(name):
    """help(bk.BatchlessNorm2d) showed a one-line docstring (the Args lived on a private base class), and
    the BatchRenorm layers documented none of their arguments."""
    obj = getattr(bk, name)
    doc = inspect.getdoc(obj) or ""
    missing = [p for p in inspect.signature(obj).parameters
               if p not in ("self", "layer_kwargs") and not re.search(rf"(?<![\w.]){p}\b", doc)]
    assert not missing, f"{name}'s docstring does not name {missing}"


def test_experiment_tables_are_copied_verbatim_from_the_results():
    """docs/experiments.md says every table is copied verbatim from a script's results.md: results are
    data, written by the scripts (one table had been retyped, its spreads rounded again)."""
    results = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples" / "results").glob("*/results.md")))
    tables, block = [], []
    for line in (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            tables.append("\n".join(block))
            block = []
    assert len(tables) >= 5
    for table in tables:
        assert table in results, f"not in any examples/results/*/results.md:\n{table}"
