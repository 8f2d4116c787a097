"""
Tests for README.md: the numbers and pointers in it that the code can check, so that they move
with the code (line counts of the files table, the pdb sessions' breakpoints).

Run: .venv/bin/python -m pytest -q test_readme.py   (instant; reads files only)
"""
import re
from pathlib import Path

ROOT = Path(__file__).parent
README = (ROOT / "README.md").read_text()


def test_readme_breakpoints_point_at_the_code_they_quote():
    """The README's pdb sessions set breakpoints by line number and quote the line; after edits to
    the code the numbers must move with it (this test names the line to use)."""
    pattern = re.compile(r"\(Pdb\) b (\w+\.py):(\d+)[^#]*# (.+?)(?:  in \w+)?$")
    found = 0
    for text in README.splitlines():
        hit = pattern.search(text)
        if not hit:
            continue
        name, line, code = hit.group(1), int(hit.group(2)), hit.group(3).strip()
        lines = (ROOT / name).read_text().splitlines()
        where = [i + 1 for i, src in enumerate(lines) if code in src]
        assert where, f"README quotes {code!r} from {name}, which no longer has it"
        assert code in lines[line - 1], f"README breaks at {name}:{line} for {code!r}, now at line(s) {where}"
        found += 1
    assert found >= 3  # the README's three pdb sessions


def test_readme_file_table_counts_the_lines():
    """The files table gives each file's line count (as `wc -l`); the tests' row sums conftest.py
    and every test_*.py."""
    rows = re.findall(r"^\| `([^`|]+)`(?:, `test_\*\.py`)? \| (\d+) \|", README, re.M)
    assert len(rows) >= 14
    for name, count in rows:
        files = [ROOT / name] + (sorted(ROOT.glob("test_*.py")) if name == "conftest.py" else [])
        lines = sum(len(f.read_text().splitlines()) for f in files)
        assert int(count) == lines, f"README's files table: {name} has {lines} lines, not {count}"
