"""The teaching notebooks: committed with their outputs, re-executed here, and checked against them.

Each notebook in notebooks/ and each solutions notebook in notebooks/solutions/ is executed by its own test (a new
one is picked up automatically) in a real Jupyter kernel, at full size, with the kernel's working directory at the
repository root. A test fails on an error, on a code cell without output, and on outputs that no longer match the
committed ones. What is compared:
- every cell's outputs, in order, by kind (stdout text, a displayed value, a figure, an audio player);
- their text (stdout and text/plain), word for word, integers exact, other numbers up to a relative 1e-3 or one unit
  of the last printed digit: the same code on the same inputs prints the same thing;
- except in cells tagged ``varies`` (training losses, timings): float kernels differ between CPUs, so a training
  run's figures move in their last digits from one machine to another; there only the kinds are compared.
stderr (warnings, progress bars) is neither output nor compared. Figures are compared by kind, not pixel.

Refresh the committed outputs after changing a notebook (executes in place, one after another):

    python tests/test_notebooks.py                  # every notebook and solution
    python tests/test_notebooks.py notebooks/03_elbo.ipynb
"""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SOLUTION_DIR = NOTEBOOK_DIR / "solutions"
EXPECTED = {
    "00_masked_diffusion_from_scratch.ipynb",
    "01_vocabulary_and_layout.ipynb",
    "02_forward_process.ipynb",
    "03_elbo.ipynb",
    "04_training.ipynb",
    "05_sampling.ipynb",
    "06_sde_batch.ipynb",
    "07_tokenizers.ipynb",
}
SOLUTIONS = {f"{name[:2]}_solutions.ipynb" for name in EXPECTED}
# Every notebook found, and every expected one even if it is missing (its tests then fail instead of skipping).
NOTEBOOKS = sorted(set(NOTEBOOK_DIR.glob("*.ipynb")) | {NOTEBOOK_DIR / name for name in EXPECTED})
ALL = NOTEBOOKS + sorted(set(SOLUTION_DIR.glob("*.ipynb")) | {SOLUTION_DIR / name for name in SOLUTIONS})
TIMEOUT_S = 300  # per cell
EXERCISE = re.compile(r"^### Exercise (\d+)\.(\d+):", re.M)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def execute(path: Path) -> nbformat.NotebookNode:
    """``path`` executed top to bottom in a fresh kernel (raises CellExecutionError at the first failing cell)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return nb


def shown(cell: nbformat.NotebookNode) -> list[dict]:
    """The outputs a reader sees: everything but stderr, consecutive stdout pieces joined (the kernel splits a
    cell's printing into pieces by timing)."""
    out: list[dict] = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream" and o.name == "stderr":
            continue
        if o.output_type == "stream" and out and out[-1].get("name") == "stdout":
            out[-1] = {**out[-1], "text": out[-1]["text"] + o.text}
        else:
            out.append(dict(o))
    return out


def kinds(cell: nbformat.NotebookNode) -> list[str]:
    return [o["name"] if o["output_type"] == "stream" else "+".join(sorted(o.get("data", {}))) for o in shown(cell)]


def text(cell: nbformat.NotebookNode) -> str:
    parts = [
        o["text"] if o["output_type"] == "stream" else o.get("data", {}).get("text/plain", "") for o in shown(cell)
    ]
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(parts))


def close(committed: str, new: str) -> bool:
    a, b = float(committed), float(new)
    if not re.search(r"[.eE]", committed):
        return a == b  # an integer (a count, a step, a size) is exact
    digits = len(committed.split(".")[1].split("e")[0].split("E")[0]) if "." in committed else 0
    return math.isclose(a, b, rel_tol=1e-3, abs_tol=1.01 * 10.0**-digits)


def same_text(committed: str, new: str) -> bool:
    """Equal word for word, numbers up to a relative 1e-3 or one unit of their last printed digit."""
    if NUMBER.sub("#", committed) != NUMBER.sub("#", new):
        return False
    return all(close(a, b) for a, b in zip(NUMBER.findall(committed), NUMBER.findall(new), strict=True))


def code_cells(nb: nbformat.NotebookNode) -> list[tuple[int, nbformat.NotebookNode]]:
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def test_outputs_compare_word_for_word_and_numbers_to_their_printed_digits() -> None:
    assert same_text("NELBO 0.1234 bits, 10 steps", "NELBO 0.1235 bits, 10 steps")  # one unit of the last digit
    assert not same_text("NELBO 0.1234 bits", "NELBO 0.1240 bits")
    assert not same_text("10 steps", "11 steps") and not same_text("NELBO 0.1234", "ELBO 0.1234")
    assert same_text("1.000e+04", "1.0005e+04") and not same_text("a 1", "a 1 2")


def test_the_eight_notebooks_and_their_solutions_are_there() -> None:
    assert {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} == EXPECTED
    assert {p.name for p in SOLUTION_DIR.glob("*.ipynb")} == SOLUTIONS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_checked_solution(path: Path) -> None:
    """At least three exercises "### Exercise N.k: title", N the notebook's number, each solved in solutions/ by
    code that asserts its check."""
    nb = nbformat.read(path, as_version=4)
    number = int(path.name[:2])
    headings = [h for c in nb.cells if c.cell_type == "markdown" for h in EXERCISE.findall(c.source)]
    assert len(headings) >= 3, f"{path.name}: {len(headings)} exercises, at least 3 expected"
    assert all(int(n) == number for n, _ in headings), f"{path.name}: exercises must be numbered {number}.k"
    solutions = nbformat.read(SOLUTION_DIR / f"{path.name[:2]}_solutions.ipynb", as_version=4)
    solved: dict[tuple[str, str], str] = {}
    current = None
    for cell in solutions.cells:
        found = EXERCISE.findall(cell.source) if cell.cell_type == "markdown" else []
        current = found[-1] if found else current
        if cell.cell_type == "code" and current:
            solved[current] = solved.get(current, "") + cell.source
    for heading in headings:
        assert heading in solved, f"{path.name}: Exercise {'.'.join(heading)} has no solution"
        assert "assert" in solved[heading], f"{path.name}: the solution of Exercise {'.'.join(heading)} checks nothing"


@pytest.mark.parametrize("path", ALL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_notebook_runs_and_matches_its_committed_outputs(path: Path) -> None:
    committed = nbformat.read(path, as_version=4)
    nbformat.validate(committed)
    assert committed.cells and committed.cells[0].cell_type == "markdown", f"{path.name} must open with markdown"
    refresh = f"refresh with: python tests/test_notebooks.py {path.relative_to(ROOT)}"
    for i, cell in code_cells(committed):
        assert shown(cell), f"{path.name}: committed cell {i} has no output; {refresh}"
    new = execute(path)
    for (i, old), (_, cell) in zip(code_cells(committed), code_cells(new), strict=True):
        assert shown(cell), f"{path.name}: cell {i} shows nothing; every code cell must show a result"
        assert kinds(cell) == kinds(old), (
            f"{path.name}: cell {i} shows {kinds(cell)}, committed {kinds(old)}; {refresh}"
        )
        if "varies" not in old.metadata.get("tags", []):
            assert same_text(text(old), text(cell)), (
                f"{path.name}: cell {i} prints\n{text(cell)}\ncommitted:\n{text(old)}\n{refresh}"
            )


def refresh(paths: list[Path]) -> None:
    """Execute each notebook in place, writing its outputs."""
    for path in paths:
        start = time.perf_counter()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    refresh([Path(p).resolve() for p in sys.argv[1:]] or ALL)
