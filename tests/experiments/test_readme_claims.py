"""Every figure in the README's "Measured" table is backed by a committed result file.

Each row of the table names its file(s) in the last column (backticked paths). Every number in
the row's `figure` cell must be found in one of those files, read as text, at the precision the
README gives it (565.1 matches 565.1, 0.77 matches 0.7709, 2,257 matches 2257), or be the ratio
of two figures of the same cell that are (1.115x = 565.1 / 506.9). A figure whose file is
missing, untracked or does not hold it fails here: quote a number only with its file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def measured_rows(readme: str) -> list[dict[str, str]]:
    """The rows of the first table under "## Measured", as {column: cell}."""
    section = readme.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header, rows = cells[0], [r for r in cells[2:]]
    return [dict(zip(header, r)) for r in rows]


def numbers(text: str) -> list[tuple[float, int]]:
    """(value, decimals) of every number in text; thousands separators (2,257) removed."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    out = []
    for m in NUMBER.finditer(text):
        s = m.group()
        mantissa = s.split("e")[0].split("E")[0]
        out.append((float(s), len(mantissa.split(".")[1]) if "." in mantissa else 0))
    return out


def _matches(value: float, decimals: int, candidates: list[float]) -> bool:
    """Some candidate rounds to value at `decimals` places."""
    tol = 0.5 * 10**-decimals + 1e-9
    return any(abs(c - value) <= tol for c in candidates)


def unbacked(figure: str, file_text: str) -> list[str]:
    """The numbers of a figure cell that the file text does not hold (nor a ratio of two held
    numbers of the same cell), as written in the cell."""
    in_file = [v for v, _ in numbers(file_text)]
    figs = numbers(figure)
    held = [v for v, d in figs if _matches(v, d, in_file)]
    ratios = [a / b for a in held for b in held if b]
    return [f"{v:g}" for v, d in figs if not (_matches(v, d, in_file) or _matches(v, d, ratios))]


def _tracked(path: str) -> bool | None:
    """Whether git tracks path (None outside a git checkout)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    r = subprocess.run(
        ["git", "ls-files", "--error-unmatch", path], cwd=REPO, capture_output=True, text=True
    )
    return r.returncode == 0


ROWS = measured_rows((REPO / "README.md").read_text())


def test_the_measured_table_has_rows_with_files():
    assert len(ROWS) >= 8
    for row in ROWS:
        assert re.findall(r"`([^`]+)`", row["file"]), row["result"]
        assert numbers(row["figure"]), row["result"]


@pytest.mark.parametrize("row", ROWS, ids=[r["result"][:40] for r in ROWS])
def test_every_readme_figure_is_in_its_file(row):
    paths = re.findall(r"`([^`]+)`", row["file"])
    texts = []
    for path in paths:
        f = REPO / path
        assert f.is_file(), f"{path} (cited for {row['result']!r}) does not exist"
        assert _tracked(path) is not False, f"{path} is not tracked by git"
        texts.append(f.read_text())
    missing = unbacked(row["figure"], "\n".join(texts))
    assert not missing, f"{row['result']!r}: {missing} not in {paths}"


def test_the_checker_refuses_a_figure_without_a_file():
    text = "| a | 565.1 | 506.9 | 0.7709 | 2257 | 3.518e+04 |"
    assert unbacked("565.1 vs 506.9: 1.115x; 0.77; 2,257; 35,180", text) == []
    assert unbacked("565.2 vs 506.9", text) == ["565.2"]  # one digit off
    assert unbacked("1.2x faster", text) == ["1.2"]  # not a ratio of the cell's own figures
    assert unbacked("0.78", text) == ["0.78"]
