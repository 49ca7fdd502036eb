"""The three notebooks run top to bottom (quick setting) and fail the suite if they break."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["generate_baselines", "memory", "training_loop"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def notebook_out(quick_reproduction):
    # The notebooks resume the quick reproduction the other tests made: they run the same
    # experiments with the same settings, so they find every cell done and redraw from it.
    return quick_reproduction


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, notebook_out, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("NOTEBOOK_OUT", str(notebook_out))
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
    assert (notebook_out / "REPORT.md").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_carry_their_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), "commit the notebook executed"
    assert not [o for cell in code for o in cell.get("outputs", []) if o.get("output_type") == "error"]
