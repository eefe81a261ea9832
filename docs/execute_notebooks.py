"""Execute the tutorial notebooks of ``notebooks/`` into ``docs/notebooks/`` (outputs kept) for the documentation site.

The site renders these executed copies (mkdocs-jupyter, ``execute: false``), so ``mkdocs build`` stays fast and needs
no kernel; ``tests/test_docs.py`` checks that their code is still that of ``notebooks/``. They run with the tiny
settings of the test suite (``PDENETS_NOTEBOOK_FAST=1``, a few minutes on 2 CPU cores); ``--full`` runs the full-size
versions. Rerun after editing ``notebooks/_build_notebooks.py``::

    python docs/execute_notebooks.py            # all five
    python docs/execute_notebooks.py 01_quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "notebooks"
TARGET = REPO / "docs" / "notebooks"


def execute(name: str, fast: bool = True, timeout: int = 900) -> Path:
    """Execute ``notebooks/<name>.ipynb`` in a kernel of this interpreter; write it to ``docs/notebooks/``."""
    notebook = nbformat.read(SOURCE / f"{name}.ipynb", as_version=4)
    with tempfile.TemporaryDirectory(prefix="pdenets_docs_") as scratch:
        spec = Path(scratch) / "jupyter" / "kernels" / "pdenets-docs"
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(
            json.dumps(
                {
                    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "pdenets docs",
                    "language": "python",
                }
            )
        )
        os.environ.update(
            JUPYTER_PATH=str(Path(scratch) / "jupyter"),
            TMPDIR=scratch,
            MPLBACKEND="module://matplotlib_inline.backend_inline",
            PDENETS_NOTEBOOK_FAST="1" if fast else "0",
        )
        NotebookClient(
            notebook, timeout=timeout, kernel_name="pdenets-docs", resources={"metadata": {"path": str(SOURCE)}}
        ).execute()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    TARGET.mkdir(parents=True, exist_ok=True)
    path = TARGET / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def main(argv: list[str] | None = None) -> None:
    names = sorted(p.stem for p in SOURCE.glob("[0-9][0-9]_*.ipynb"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"notebooks to execute (default: all of {', '.join(names)})"
    )
    parser.add_argument("--full", action="store_true", help="full-size settings instead of PDENETS_NOTEBOOK_FAST=1")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"no notebook {', '.join(unknown)}; valid names: {', '.join(names)}")
    for name in args.names or names:
        start = time.perf_counter()
        path = execute(name, fast=not args.full)
        print(f"{path.relative_to(REPO)}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
