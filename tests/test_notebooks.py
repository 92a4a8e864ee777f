"""The notebooks: committed without outputs, and each runs top to bottom (small configuration).

The execution tests start a ``python3`` kernel (ipykernel, installed with the dev extras into
the same environment) with ``ATTENTION_DRIFT_SMALL=1``: a few records, cheap editor settings
and 64-sequence covariance statistics (cached under ``~/.cache/attention_drift``; a fresh
machine computes them in the first notebook that edits).
"""

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_exist():
    names = {p.name for p in PATHS}
    for expected in ("00_tour.ipynb", "01_case_study.ipynb", "02_prevalence.ipynb", "03_which_module.ipynb",
                     "04_drift_vs_failure.ipynb", "05_patching.ipynb", "06_sadr.ipynb"):
        assert expected in names


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_outputs_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them "
                       "(Clear All Outputs, or jupyter nbconvert --clear-output --inplace)")


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("ATTENTION_DRIFT_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the kernel must be this interpreter (the venv), whatever kernels are installed elsewhere
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells raised {errors}"
