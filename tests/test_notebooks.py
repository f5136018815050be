"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom without an error.

They run with nbclient in a kernel of this interpreter (ipykernel's own kernel spec), from the notebooks folder,
with this process's environment (GEOSR_DATA, PYTHONPATH), against the shared data. Minutes each on a CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_quick_start.ipynb", "02_modalities_and_control.ipynb",
                                           "03_scoring.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, data, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME, KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(NATIVE_KERNEL_NAME)
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve() or spec.argv[0] == "python", spec.argv
    nb = nbformat.read(path, as_version=4)
    # absolute: the kernel runs from notebooks/, and `make test` passes GEOSR_DATA as ../shared/data
    env = dict(os.environ, GEOSR_DATA=str(Path(data).resolve()), MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name=NATIVE_KERNEL_NAME,
                                     resources={"metadata": {"path": str(path.parent)}})
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()  # raises CellExecutionError naming the cell on any error
    finally:
        os.environ.clear()
        os.environ.update(old)
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
