"""The quickstart notebook is stored without outputs and runs top to bottom (tiny settings, CPU, offline)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "notebooks" / "quickstart.ipynb"
COLAB_URL = (
    "https://colab.research.google.com/github/hf-distill/hf-distill/blob/main/examples/notebooks/quickstart.ipynb"
)


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], f"outputs left in the cell starting {cell.source[:60]!r}: strip them"
        assert cell.execution_count is None, f"execution count left in the cell starting {cell.source[:60]!r}"


def test_notebook_has_colab_badge_and_guarded_install():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert COLAB_URL in notebook.cells[0].source
    install = [cell for cell in notebook.cells if cell.cell_type == "code" and "pip install" in cell.source]
    assert len(install) == 1 and "HF_DISTILL_SKIP_INSTALL" in install[0].source


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    # The kernel inherits this environment: no install, tiny settings, offline.
    monkeypatch.setenv("HF_DISTILL_SKIP_INSTALL", "1")
    monkeypatch.setenv("HF_DISTILL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest on a busy machine
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "\n".join(output.get("text", "") for output in outputs)
    assert "reloaded logits match" in text
    assert "exact match" in text
    assert "packed ternary model reloaded: BitLinear" in text and "ternary  perplexity" in text
    assert (tmp_path / "outputs" / "quickstart" / "student" / "config.json").is_file()
    # the curves cell drew a figure
    assert any("image/png" in output.get("data", {}) for output in outputs)
