"""README.md and docs/*.md: every relative link resolves (file, and #anchor when given); README stays short."""

import pathlib
import re
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_BYTES = 10_500  # "about 10 KB": the newcomer's page; depth goes in docs/

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _pages():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _prose_lines(path):
    """Lines outside fenced code blocks (a `[x](y)` inside code is not a link)."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def _slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).strip().lower()
    kept = "".join(c for c in text if c in " -" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for line in _prose_lines(path):
        m = HEADING.match(line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path):
    """(link, reason) for each relative link in `path` whose file or heading anchor does not exist."""
    bad = []
    for line in _prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links (link text in code stays a link)
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                bad.append((target, "no such file"))
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append((target, f"no heading '#{anchor}' in {dest.name}"))
    return bad


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f"{page.relative_to(ROOT)}: broken links"


def test_docs_exist_and_readme_links_each():
    docs = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"backdoorbench.md", "optimizer.md", "reliability.md", "evidence.md"} <= docs
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [d for d in sorted(docs) if f"(docs/{d}" not in readme] == [], "a docs page the README never links"


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move depth into docs/ (limit {README_MAX_BYTES})"


def test_readme_has_results_section():
    """The lead replaces the headline table under this exact heading."""
    assert "## Results" in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()


def test_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    (tmp_path / "there.md").write_text("# A heading, with `code`\n", encoding="utf-8")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://x.org/y)\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n```\n[in code](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [("missing.md", "no such file"), ("there.md#nope", "no heading '#nope' in there.md")]
