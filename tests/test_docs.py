"""The documentation speaks of the project itself: no word about how it was made, and every link in it leads
somewhere. Checks every Markdown file (README.md, BENCHMARKS.md, docs/, results/) and the Python sources."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKDOWN = sorted(glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md"))
                  + glob.glob(os.path.join(ROOT, "results", "*.md")))
PYTHON = sorted(p for folder in ("", "util", "tools", "tests") for p in glob.glob(os.path.join(ROOT, folder, "*.py"))
                if not p.endswith("test_docs.py"))   # not its own list
# How the project was made is not what a user reads it for: "not yet measured on a GPU", not "no GPU was lent".
ABOUT_THE_MAKING = re.compile(r"\blent\b|\bissues? ?#?\d|\bthe issue\b|\bissue's\b|\bhelpers?\b|\b(?:this|that|"
                              r"earlier|previous|next|last) (?:session|task)\b|\bthe task\b", re.IGNORECASE)


@pytest.mark.parametrize("path", MARKDOWN + PYTHON, ids=lambda p: os.path.relpath(p, ROOT))
def test_the_project_speaks_of_itself_only(path):
    with open(path, encoding="utf-8") as f:
        found = [f"{os.path.relpath(path, ROOT)}:{n}: {m.group(0)!r}" for n, line in enumerate(f, 1)
                 for m in ABOUT_THE_MAKING.finditer(line)]
    assert not found, found


def test_the_wording_check_catches_the_phrases_it_is_for():
    for line in ("not measured yet (no GPU lent to this task)", "Targets from issue 16", "the issue's targets",
                 "four helpers ran tests", "in this session"):
        assert ABOUT_THE_MAKING.search(line), line
    for line in ("not yet measured on a GPU", "photos taken in one sitting (session)", "a test session's fixture"):
        assert not ABOUT_THE_MAKING.search(line), line


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_in_the_markdown_leads_to_a_file(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    missing = [target for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
               if "://" not in target and not os.path.exists(os.path.join(os.path.dirname(path), target))]
    assert not missing, missing
