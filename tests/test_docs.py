"""The docs: the README stays a page a newcomer reads in minutes, and no relative link in ``README.md`` or
``docs/`` points to nothing.

``mkdocs build --strict`` in ``.ci/check`` checks the site's own links, anchors and nav; these checks also
cover the README (which the site does not build) and run without mkdocs installed.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
"""A markdown link or image, its text possibly over several lines; group 1 is the target."""
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
"""``https:``, ``mailto:``, ...: not a file of the repository."""


def pages(root: Path) -> list[Path]:
    """The README and every page of the docs site."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def without_code(text: str, spans: bool = True) -> str:
    """``text`` with fenced code blocks (and, with ``spans``, inline code) blanked: a link there is an example."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    out = "\n".join(lines)
    return re.sub(r"`[^`\n]*`", "", out) if spans else out


def anchors(page: Path) -> set[str]:
    """The heading anchors of a page, as GitHub makes them (lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats); mkdocs makes the same ones for these headings."""
    seen: dict[str, int] = {}
    for line in without_code(page.read_text(encoding="utf-8"), spans=False).split("\n"):
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[base] = seen.get(base, -1) + 1
    return {base if n == 0 else f"{base}-{n}" for base, count in seen.items() for n in range(count + 1)}


def broken_links(root: Path) -> list[str]:
    """Every relative link of ``pages(root)`` whose file does not exist, whose heading anchor the target
    lacks, or (from a docs page) that leaves ``docs/``, which the site cannot follow."""
    docs = (root / "docs").resolve()
    problems = []
    for page in pages(root):
        name = page.relative_to(root).as_posix()
        for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
            if SCHEME.match(target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page.resolve()
            if not resolved.exists():
                problems.append(f"{name}: {target} (no such file)")
            elif page.resolve().is_relative_to(docs) and not resolved.is_relative_to(docs):
                problems.append(f"{name}: {target} (outside docs/: the site cannot link to it)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{name}: {target} (no heading #{anchor} in {resolved.name})")
    return problems


def nav_files(nav: list) -> list[str]:
    """The pages named in mkdocs.yml's ``nav``, depth first."""
    out: list[str] = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            out += nav_files(value) if isinstance(value, list) else [value]
    return out


def test_readme_is_at_most_200_lines_and_states_the_test_command():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "python -m pytest -n 2" in text  # CI runs "the README's test command" (.ci/check)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    assert len(pages(REPO)) > 20  # the README and the docs pages were found
    assert broken_links(REPO) == []


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_files(config["nav"])
    on_disk = sorted(p.relative_to(REPO / "docs").as_posix() for p in pages(REPO)[1:])
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


def test_the_link_check_reports_each_kind_of_broken_link(tmp_path: Path):
    (tmp_path / "docs/stages").mkdir(parents=True)
    (tmp_path / "README.md").write_text(
        "# Top\n\nSee [a](docs/a.md), [the\nstage](docs/stages/s.md#what-it-does), [gone](docs/gone.md),\n"
        "[bad anchor](docs/a.md#nope), [here](#top), [web](https://example.com/x.md) and `[code](nope.md)`.\n"
        "```\n[fenced](nope.md)\n```\n"
    )
    (tmp_path / "docs/a.md").write_text("# A\n\n![figure](fig.png) [up](../README.md) [s](stages/s.md)\n")
    (tmp_path / "docs/stages/s.md").write_text("# `s`\n\n## What it does\n\n[back](../a.md#a) [x](../b.md)\n")
    assert broken_links(tmp_path) == [
        "README.md: docs/gone.md (no such file)",
        "README.md: docs/a.md#nope (no heading #nope in a.md)",
        "docs/a.md: fig.png (no such file)",
        "docs/a.md: ../README.md (outside docs/: the site cannot link to it)",
        "docs/stages/s.md: ../b.md (no such file)",
    ]
