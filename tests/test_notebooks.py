"""Every notebook under notebooks/ runs top to bottom against the tiny local model.

Notebooks take their inputs in a cell tagged ``parameters`` (papermill's
convention); the test inserts a cell after it that points MODEL at the tiny
checkpoint and keeps MAX_TOKENS small. The committed notebooks carry no outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; the kernel start and the first load are the slow ones


def test_there_are_notebooks():
    assert any(p.name == "01_quickstart.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, chat_model_dir, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: strip its outputs"
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{path.name}: needs one cell tagged 'parameters'"
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(f"MODEL = {str(chat_model_dir)!r}\nMAX_TOKENS = 8"))

    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert all(c.execution_count is not None for c in code)  # execute() raises at the first failing cell
