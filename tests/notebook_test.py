"""The notebooks: committed without outputs, and the quickstart runs end to end (tiny size)."""

import json
import pathlib

import pytest
from subprocesses import TIMEOUT_S

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert ROOT / "notebooks" / "quickstart.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [(i, c) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    dirty = [i for i, c in code if c["outputs"] or c["execution_count"] is not None]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs or execution counts. Fix: clear "
        "them before committing (e.g. jupyter nbconvert --clear-output --inplace)"
    )


def test_quickstart_runs_end_to_end(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("VISTA_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("VISTA_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # Raises CellExecutionError, with the cell's traceback, on any error.
    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
        for out in cell.outputs
    )  # fmt: skip
    assert "size tiny" in text and "vista_downstream" in text and "recent_only" in text
    assert "L=1024: summarizer" in text
    assert (tmp_path / "tiny" / "run" / "cache").is_dir()
