"""The documentation: the site in docs/ builds with MkDocs in strict mode (a broken link or anchor, a page missing
from the navigation, a missing image fail it), the README is a short door into it whose relative links all resolve,
and neither speaks of how the product was built."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))

FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Work history, not the product: issue numbers, work periods, sessions and rounds of work, fixes told as events.
HISTORY = re.compile(
    r"issue #\d+|\bwork periods?\b|\b(?:this|last|previous|next) (?:session|round)\b|\bsession \d+|\bstop \d+\b"
    r"|\b(?:before|after) the fixes\b|\bfixed, so\b",
    re.I,
)


def relative_links(markdown: str) -> list[str]:
    """The targets of the markdown links and images outside code, without URLs and in-page anchors."""
    prose = INLINE_CODE.sub("", FENCED.sub("", markdown))
    targets = [m.group(1) for m in LINK.finditer(prose)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_the_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    for page in PAGES:  # every page was built (strict mode also refuses a page left out of the nav)
        built = tmp_path / "site" / page.relative_to(ROOT / "docs").with_suffix("") / "index.html"
        if page.name == "index.md":
            built = tmp_path / "site" / page.relative_to(ROOT / "docs").parent / "index.html"
        assert built.is_file(), f"{page.relative_to(ROOT)} was not built"


def test_every_relative_link_in_the_readme_resolves():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "the README links into docs/"
    broken = [t for t in links if not (README.parent / t.split("#")[0]).exists()]
    assert not broken, f"README.md links to missing files: {broken}"


def test_the_readme_links_to_every_docs_page():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README.read_text(encoding="utf-8"))}
    unlinked = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in linked]
    assert not unlinked, f"pages the README does not link to: {unlinked}"


def test_the_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move the rest into docs/"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_tell_no_history(path):
    text = path.read_text(encoding="utf-8")
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in HISTORY.finditer(text)]
    assert not found, f"{path.relative_to(ROOT)} tells how it was built, not what it is: {found}"


def test_the_history_pattern_catches_what_it_is_for():
    for sentence in (
        "see issue #12",
        "in work period 3",
        "this session's fix",
        "as in stop 4",
        "rerun after the fixes",
    ):
        assert HISTORY.search(sentence), sentence
    for sentence in ("Ray's session directory", "stops after 5 epochs", "lot_simulability_before_fixes.json"):
        assert not HISTORY.search(sentence), sentence
