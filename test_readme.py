"""
Tests for README.md and the pages in docs/: what a reader relies on and the code can check.

  - every pdb breakpoint `(Pdb) b FILE.py:N ...  # code` stops on the line of FILE.py it quotes, and
    every place pdb shows (`> .../FILE.py(N)func()` then `-> code`) is that line
  - every relative link (markdown links and images) leads to a file that exists, and a link to a
    heading (`page.md#anchor`) to a heading that exists
  - every docs/*.md page is linked from README.md
  - README.md stays a front door: at most README_MAX_LINES lines
  - the README's Python usage runs as written, from another folder with the root on PYTHONPATH

Run: .venv/bin/python -m pytest -q test_readme.py   (the usage snippet loads the default model)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 250  # the front door's budget: everything else belongs in docs/

BREAKPOINT = re.compile(r"\(Pdb\) b (\w+\.py):(\d+)[^#]*# (.+?)(?:  in \w+)?$")
LOCATION = re.compile(r"^> \.\.\./(\w+\.py)\((\d+)\)\S*\n-> (.+)$", re.M)  # pdb: where it stopped
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a link inside one is code, not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(page: Path) -> set:
    """The anchors of a page's headings, as GitHub makes them: lower case, punctuation dropped
    (but - and _), spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", _prose(page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_breakpoints_point_at_the_code_they_quote():
    """The pdb sessions set breakpoints by line number and quote the line; after edits to the code
    the numbers must move with it (the message names the line to use)."""
    found = 0
    for page in PAGES:
        for text in page.read_text().splitlines():
            hit = BREAKPOINT.search(text)
            if not hit:
                continue
            name, line, code = hit.group(1), int(hit.group(2)), hit.group(3).strip()
            lines = (ROOT / name).read_text().splitlines()
            where = [i + 1 for i, src in enumerate(lines) if code in src]
            assert where, f"{page.name} quotes {code!r} from {name}, which no longer has it"
            assert line <= len(lines) and code in lines[line - 1], (
                f"{page.name} breaks at {name}:{line} for {code!r}, now at line(s) {where}")
            found += 1
    assert found >= 3, f"only {found} pdb breakpoints found; the docs show three sessions"


def test_pdb_locations_show_the_line_they_print():
    """pdb's `> .../FILE.py(N)func()` lines in the sessions, each followed by `-> code`: line N of
    FILE.py holds that code."""
    found = 0
    for page in PAGES:
        for name, line, code in LOCATION.findall(page.read_text()):
            lines = (ROOT / name).read_text().splitlines()
            where = [i + 1 for i, src in enumerate(lines) if code.strip() in src]
            assert int(line) <= len(lines) and code.strip() in lines[int(line) - 1], (
                f"{page.name} shows {name}({line}) for {code.strip()!r}, now at line(s) {where}")
            found += 1
    assert found >= 5, f"only {found} pdb locations found"


def test_relative_links_resolve():
    """Every relative link and image in README.md and docs/*.md names a file that exists; a
    `#anchor` names a heading of the page it points to."""
    checked = 0
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not ours to check
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_file(), f"{page.name} links to {target!r}, but {dest} does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), (
                    f"{page.name} links to {target!r}, but {dest.name} has no heading #{anchor}")
            checked += 1
    assert checked >= 5


def test_every_docs_page_is_linked_from_the_readme():
    """A page nobody can reach from the front door is a page nobody reads."""
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(_prose(README.read_text()))}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link to docs/{', docs/'.join(missing)}"


def test_readme_is_a_front_door():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines, over its budget of {README_MAX_LINES}: move details to a docs/ page")


def test_the_python_usage_runs_as_written(tmp_path):
    """The README's Python block, verbatim, in a fresh process whose working folder is not the
    repository (the modules are not installed: PYTHONPATH is how the README says to reach them)."""
    block = re.search(r"^## Python usage\n.*?^```python\n(.*?)^```", README.read_text(), re.M | re.S).group(1)
    (tmp_path / "usage.py").write_text(block + "print(repr(answer))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "usage.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "heads.safetensors").exists()  # the snippet's save_head_scores wrote here
    assert r.stdout.strip().splitlines()[-1] not in ("''", '""')  # generate answered something
