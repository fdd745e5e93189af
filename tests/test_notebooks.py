"""
Execute every tutorial notebook (``tutorials/*.ipynb``) in quick mode, and check that each is
saved without outputs.

Quick mode (``PYRO_WAKESLEEP_QUICK=1``) shrinks each notebook's data and training so that it runs
top to bottom in well under a minute. The kernel is started from a kernelspec written into a
temporary folder and pointing to ``sys.executable``, so the notebooks run with the interpreter
(and the installed package) that runs pytest, whatever kernels the machine has.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 300


def _ids(paths):
    return [path.name for path in paths]


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec named ``python3`` for this interpreter, found first through JUPYTER_PATH."""
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    saved = {key: os.environ.get(key) for key in ("JUPYTER_PATH", "PYRO_WAKESLEEP_QUICK")}
    paths = [str(root)] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else [])
    os.environ["JUPYTER_PATH"] = os.pathsep.join(paths)
    # nbclient passes the parent environment to the kernel.
    os.environ["PYRO_WAKESLEEP_QUICK"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_in_quick_mode(path, kernel_env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager

    # The kernel runs this interpreter (so the notebooks see the package under test).
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(TUTORIALS)}},
        allow_errors=False,
    )
    # Raises CellExecutionError, naming the cell and the traceback, on any error.
    client.execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_saved_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat v4 notebook"
    dirty = [
        index
        for index, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"
