"""Every tutorial notebook executes top to bottom with tiny settings (what ``pytest --nbmake`` would do).

The notebooks run with nbclient in a kernel of the current interpreter, with the working directory
``notebooks/`` (they find ``configs/`` from there), ``PDENETS_NOTEBOOK_FAST=1`` and matplotlib's
inline backend (headless Agg rendering that turns every shown figure into a PNG output, which the
test counts). They write their logs into temporary directories; the test checks that the tree
stays clean.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.notebooks

nbformat = pytest.importorskip("nbformat", reason="install the notebook extras: pip install -e '.[notebooks]'")
NotebookClient = pytest.importorskip(
    "nbclient", reason="install the notebook extras: pip install -e '.[notebooks]'"
).NotebookClient

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "01_quickstart",
    "02_solver_robustness",
    "03_prnet_governing_equation",
    "04_pde_cnn_dynamics",
    "05_robustness",
]


def _kernel_spec(tmp_path: Path) -> str:
    """A kernel spec that runs ipykernel with this interpreter, so the notebooks see the tested package."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "pdenets-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pdenets test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return str(tmp_path / "jupyter")


def _tree_snapshot() -> set[str]:
    """Everything under notebooks/ and the top-level entries of the repository (where stray logs would go)."""
    inside = {str(p.relative_to(REPO_ROOT)) for p in NOTEBOOK_DIR.rglob("*") if "__pycache__" not in p.parts}
    return inside | {p.name for p in REPO_ROOT.iterdir()}


def test_every_listed_notebook_exists_with_stripped_outputs() -> None:
    assert [path.stem for path in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code_cells, f"{path.name} has no code"
        assert all(not cell.outputs and cell.execution_count is None for cell in code_cells), (
            f"{path.name} is committed with outputs; regenerate it with `python notebooks/_build_notebooks.py`"
        )
        sources = "\n".join(cell.source for cell in code_cells)
        assert "from tests" not in sources and "import tests" not in sources, f"{path.name} imports test helpers"


def test_notebooks_are_what_their_build_script_writes() -> None:
    build = runpy.run_path(str(NOTEBOOK_DIR / "_build_notebooks.py"))
    assert list(build["NOTEBOOKS"]) == EXPECTED
    for name, cells in build["NOTEBOOKS"].items():
        expected = json.loads(nbformat.writes(build["notebook"](name, cells)))
        committed = json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text())
        assert committed == expected, f"{name}.ipynb differs from notebooks/_build_notebooks.py; rerun the script"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", _kernel_spec(tmp_path))
    monkeypatch.setenv("PDENETS_NOTEBOOK_FAST", "1")
    # matplotlib's inline backend (it renders with Agg, headless) turns every shown figure into a PNG output.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile.mkdtemp() logs land here
    monkeypatch.setenv("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    notebook = nbformat.read(path, as_version=4)
    before = _tree_snapshot()
    client = NotebookClient(
        notebook, timeout=240, kernel_name="pdenets-test", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    created = _tree_snapshot() - before
    assert not created, f"{path.name} wrote into the repository: {sorted(created)[:5]}"
    figures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} showed {len(figures)} figure(s)"
    assert list(tmp_path.glob("pdenets_*")), f"{path.name} made no temporary log directory"
