"""The teaching notebooks run top to bottom, and are committed without outputs.

Each notebook in notebooks/ is executed by its own test (a new notebook is picked up automatically) in a real
Jupyter kernel, with the kernel's working directory at the repository root and ``MDM_NOTEBOOK_STEPS`` set small:
every notebook reads it and caps its training steps, sampling steps and Monte-Carlo draws, so a notebook runs in
seconds instead of minutes. What runs is the notebooks' own code against the repository's modules, so a change
that breaks a notebook breaks this test.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = {
    "01_vocabulary_and_layout.ipynb",
    "02_forward_process.ipynb",
    "03_elbo.ipynb",
    "04_training.ipynb",
    "05_sampling.ipynb",
    "06_sde_batch.ipynb",
}
# Every notebook found, and every expected one even if it is missing (its tests then fail instead of skipping).
NOTEBOOKS = sorted(set(NOTEBOOK_DIR.glob("*.ipynb")) | {NOTEBOOK_DIR / name for name in EXPECTED})
QUICK_STEPS = "2"  # MDM_NOTEBOOK_STEPS in the tests: each notebook runs in well under a minute on 2 CPU cores
TIMEOUT_S = 300  # per cell


def test_the_six_teaching_notebooks_are_there() -> None:
    assert {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count; clear it"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} must open with a markdown cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment: the step cap, and one thread per math library (the kernel
    # may share two cores with other test workers; the notebooks also call torch.set_num_threads(1) when capped).
    monkeypatch.setenv("MDM_NOTEBOOK_STEPS", QUICK_STEPS)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
