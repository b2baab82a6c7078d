"""Committed notebooks are clean: no outputs, no execution counts, and the workbook's kernel.

Executed copies belong in runs/ (papermill writes them there); a notebook saved after running it in
JupyterLab would otherwise carry its outputs into the diff. The kernel name is the one `make setup`
registers (Makefile: KERNEL_NAME), which papermill starts for `make demo`.

The one exception: a cell marked ``# NBVAL_CHECK_OUTPUT`` keeps the output that nbval compares (a
demo's expected-result lines, see ``engine.logging.expectation``), and only that output, with the
execution count nbval requires of a cell whose output it compares.
"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "pyconv-workbook"


def test_there_are_notebooks():
    assert NOTEBOOKS


def _checked(cell: dict) -> bool:
    """A cell whose stored output nbval compares, holding nothing but stdout text (and an execution
    count: nbval refuses a stored output of a cell never run)."""
    return "".join(cell["source"]).startswith("# NBVAL_CHECK_OUTPUT") and all(
        out.get("output_type") == "stream" and out.get("name") == "stdout" for out in cell["outputs"]
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [
        i
        for i, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code"
        and not _checked(cell)
        and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts; clear them "
        f"(JupyterLab: Edit > Clear Outputs of All Cells) before committing"
    )
    assert notebook["metadata"]["kernelspec"]["name"] == KERNEL_NAME, (
        f"{path.name}: kernelspec {notebook['metadata']['kernelspec']['name']!r}, expected {KERNEL_NAME!r} "
        f"(the kernel make setup registers)"
    )


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] in ("01", "02", "03", "04")], ids=lambda p: p.name)
def test_task_notebook_ends_with_a_check_that_can_fail(path):
    """Each task notebook's last cell is a checked cell whose stored lines all say "met": nbval then fails
    when a run prints "NOT met" (engine.logging.expectation)."""
    last = json.loads(path.read_text(encoding="utf-8"))["cells"][-1]
    assert _checked(last), f"{path.name}: the last cell is not a # NBVAL_CHECK_OUTPUT cell"
    lines = "".join(text for out in last["outputs"] for text in out["text"]).splitlines()
    assert lines and all(line.endswith(": met") for line in lines), lines
