"""The documentation holds together: a short README, links that resolve, commands that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, numbered as GitHub numbers repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def links(path: Path) -> list[str]:
    """The targets of the links and images of a markdown file (code blocks left out)."""
    prose = "\n".join(_prose(path.read_text()))
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return LINK.findall(prose)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_slugs_follow_github():
    assert _slug("Where a round's time goes") == "where-a-rounds-time-goes"
    assert _slug("Quantised factors: int8 and int4") == "quantised-factors-int8-and-int4"
    assert _slug("Your own model and data (`custom`)") == "your-own-model-and-data-custom"
    assert _slug("5. Start a SuperNode (each site)") == "5-start-a-supernode-each-site"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = {README.resolve()}, [README]
    while todo:
        page = todo.pop()
        for target in links(page):
            file_part = target.partition("#")[0]
            if not file_part or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            dest = (page.parent / file_part).resolve()
            if dest.suffix == ".md" and dest.exists() and dest not in reached:
                reached.add(dest)
                todo.append(dest)
    assert not [p.name for p in DOCS if p.resolve() not in reached]


def _module_exists(name: str) -> bool:
    parts = name.split(".")
    if (ROOT / parts[0]).is_dir():  # one of the project's own packages
        base = ROOT.joinpath(*parts)
        return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
    return importlib.util.find_spec(parts[0]) is not None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_commands_shown_exist(page):
    text = page.read_text()
    missing = [f"python -m {m}" for m in re.findall(r"python -m ([\w.]+)", text)
               if not _module_exists(m)]
    missing += [f"bash {s}" for s in re.findall(r"bash (scripts/[\w./-]+)", text)
                if not (ROOT / s).is_file()]
    assert not missing


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "bash scripts/run.sh" in text and "bash scripts/test.sh" in text


def test_the_architecture_page_names_every_module_of_the_package():
    """docs/architecture.md maps every top-level module and subpackage of ``fedlora``."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "fedlora"
    names = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
    names += [p.name for p in package.iterdir() if (p / "__init__.py").is_file()]
    unnamed = [n for n in names if f"fedlora/{n}" not in text and f"`{n}`" not in text]
    assert unnamed == []
