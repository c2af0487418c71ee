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


# Pointers to documents: in the code and the docs alike, a name like "docs/design.md §3" or "BENCHMARKS.md" must be
# a file of this repository (and the section a heading "## 3." of it): a reader who follows it finds it.
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.md)\b(?: §(\d+))?")
OUTSIDE = re.compile(r"\b(?:SPEC|STYLE)(?:\.md)?\b")


DOCUMENT = re.compile(r"docs/[\w-]+\.md|[A-Z][A-Z_]*\.md")   # in code: a page of docs/ or a root document by name


def pointers(path):
    """[(line number, file named, section number or None)] of every .md name in the file: in Markdown every one
    (relative to the page, then to the root), in Python the names of documents (DOCUMENT; a test's own output files,
    such as out / "rehearsal_imagenet_lt.md", are not pointers)."""
    with open(path, encoding="utf-8") as f:
        return [(n, m.group(1), m.group(2)) for n, line in enumerate(f, 1) for m in MD_NAME.finditer(line)
                if "://" not in line[max(0, m.start() - 40):m.start()]
                and (path.endswith(".md") or DOCUMENT.fullmatch(m.group(1)))]


def resolve(path, name):
    here = os.path.join(os.path.dirname(path), name)
    return here if path.endswith(".md") and os.path.exists(here) else os.path.join(ROOT, name)


@pytest.mark.parametrize("path", MARKDOWN + PYTHON, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_document_the_project_points_to_is_in_the_repository(path):
    with open(path, encoding="utf-8") as f:
        outside = [f"{os.path.relpath(path, ROOT)}:{n}" for n, line in enumerate(f, 1) if OUTSIDE.search(line)]
    assert not outside, f"pointers to documents the repository does not have: {outside}"
    broken = []
    for n, name, section in pointers(path):
        target = resolve(path, name)
        if not os.path.exists(target):
            broken.append(f"{os.path.relpath(path, ROOT)}:{n}: {name}")
        elif section:
            with open(target, encoding="utf-8") as f:
                if not re.search(rf"^## {section}\. ", f.read(), re.M):
                    broken.append(f"{os.path.relpath(path, ROOT)}:{n}: {name} §{section}")
    assert not broken, broken


def test_the_pointer_check_catches_what_it_is_for(tmp_path):
    page = tmp_path / "page.py"
    page.write_text('"""See docs/design.md §3, docs/design.md §42, docs/nowhere.md and SPEC.md §2."""\n')
    assert [(name, section) for _, name, section in pointers(str(page))] == [
        ("docs/design.md", "3"), ("docs/design.md", "42"), ("docs/nowhere.md", None), ("SPEC.md", "2")]
    assert OUTSIDE.search(page.read_text())
    with pytest.raises(AssertionError, match=r"design.md §42.*nowhere.md"):
        missing = []
        for _, name, section in pointers(str(page)):
            target = os.path.join(ROOT, name)
            if not os.path.exists(target):
                missing.append(name)
            elif section and not re.search(rf"^## {section}\. ", open(target, encoding="utf-8").read(), re.M):
                missing.append(f"{name} §{section}")
        assert not missing, missing



TEST_FILE = re.compile(r"(open_clip's )?\b(tests/test_\w+\.py)")   # a test file named by its path (not open_clip's own)


@pytest.mark.parametrize("path", MARKDOWN + PYTHON, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_test_file_the_project_names_is_in_the_repository(path):
    with open(path, encoding="utf-8") as f:
        missing = [f"{os.path.relpath(path, ROOT)}:{n}: {m.group(2)}" for n, line in enumerate(f, 1)
                   for m in TEST_FILE.finditer(line)
                   if not m.group(1) and not os.path.exists(os.path.join(ROOT, m.group(2)))]
    assert not missing, missing
