"""The notebooks in notebooks/: shipped stripped, and executed end to end on the embedded tiny LLaVA-1.5.

Each notebook runs in a fresh Jupyter kernel (the ``python3`` kernel of this environment) with
``DYMU_CACHE_DIR`` pointing at the session's tiny-model cache (``tiny_cache``: built and calibrated once per
test session), so no notebook builds the model again. ``python -m pytest --nbmake notebooks/`` runs the same
notebooks through nbmake (see notebooks/README.md).
"""

import sys
from pathlib import Path

import ipykernel  # noqa: F401 - the dev extra installs nbmake and ipykernel; a missing one must fail, not skip
import nbclient
import nbformat
import pytest

from conftest import REPO

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"complexity_vs_tokens", "merge_maps", "vtu_fidelity"}
# Environment variables the notebooks read; cleared so that a developer's settings do not leak into the tests.
NOTEBOOK_ENV = ("DYMU_NOTEBOOK_MODEL", "DYMU_NOTEBOOK_THRESHOLDS", "DYMU_NOTEBOOK_DTYPE", "DYMU_NOTEBOOK_DEVICE",
                "DYMU_NOTEBOOK_IMAGES", "DYMU_NOTEBOOK_VARIANT")


def execute(nb, timeout: int = 600):
    """Run ``nb`` in place in a fresh ``python3`` kernel with the notebook folder as working directory."""
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    return client.execute()


def errors(nb) -> list[str]:
    return ["\n".join(o.get("traceback", [])) or f"{o.get('ename')}: {o.get('evalue')}"
            for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]


def stdout(nb) -> str:
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.fixture
def notebook_env(tiny_cache, monkeypatch):
    """The kernel inherits os.environ when it starts: the shared tiny cache, offline, the tiny model."""
    for name in NOTEBOOK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DYMU_CACHE_DIR", str(tiny_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_cache


def test_the_three_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED
    assert (NOTEBOOK_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parametrised(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.get("outputs") == [], f"{path.name}: a cell has outputs; strip them before committing"
        assert cell.get("execution_count") is None, f"{path.name}: a cell has an execution count"
        assert "execution" not in cell.metadata, f"{path.name}: a cell has execution timing metadata"
    assert nb.cells[0].cell_type == "markdown", "the first cell documents the notebook and its parameters"
    assert "DYMU_NOTEBOOK_MODEL" in nb.cells[0].source
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the tagged parameters cell"
    assert 'os.environ.get("DYMU_NOTEBOOK_MODEL", "tiny")' in code[0].source


def test_kernel_runs_in_this_environment(notebook_env):
    """nbclient's python3 kernel is this interpreter, and it imports this repo's packages."""
    source = ("import os, sys, dymu, llava\n"
              "print(sys.prefix); print(llava.__file__); print(os.environ['DYMU_CACHE_DIR'])")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    execute(nb, timeout=120)
    assert not errors(nb), errors(nb)
    prefix, llava_file, cache = stdout(nb).split()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), "the kernel runs another Python environment"
    assert Path(llava_file).resolve().is_relative_to(REPO)
    assert cache == str(notebook_env)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_model(path, notebook_env):
    nb = nbformat.read(path, as_version=4)
    execute(nb)  # raises CellExecutionError on the first failing cell
    assert not errors(nb), errors(nb)
    out = stdout(nb)
    assert f"model: {notebook_env / 'llava15_tiny'} (float32, cpu)" in out
    assert "done in" in out
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook shows its plots inline"
