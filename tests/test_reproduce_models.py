"""labkit reproduce runs a notebook again on the models of notebooks/models.yml."""

from __future__ import annotations

import pytest

from labkit.core import plotting
from labkit.lab import reproduce


def _notebooks(tmp_path):
    for stem in ("01_a", "02_b"):
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    return sorted(tmp_path.glob("*.ipynb"))


def test_each_notebook_then_its_model_runs(tmp_path) -> None:
    nbs = _notebooks(tmp_path)
    (tmp_path / "models.yml").write_text("01_a: [smollm2-135m, other]\n")
    names = [j.name for j in reproduce.jobs_for(nbs)]
    assert names == ["01_a", "01_a@smollm2-135m", "01_a@other", "02_b"]
    assert [j.name for j in reproduce.jobs_for(nbs, with_models=False)] == ["01_a", "02_b"]


def test_bad_models_file_names_the_file_and_the_stem(tmp_path) -> None:
    (tmp_path / "models.yml").write_text("01_a: smollm2-135m\n")
    with pytest.raises(ValueError, match=r"models.yml: models of '01_a' must be a list"):
        reproduce.model_runs("01_a", tmp_path / "models.yml")
    (tmp_path / "models.yml").write_text("- 01_a\n")
    with pytest.raises(ValueError, match="models.yml: expected a mapping"):
        reproduce.model_runs("01_a", tmp_path / "models.yml")


def test_quick_parameters_of_a_model_run_add_to_the_notebooks(tmp_path) -> None:
    quick = tmp_path / "quick.yml"
    quick.write_text("01_a: {GEN: 8, N: 2}\n01_a@smollm2-135m: {GEN: 4}\n")
    assert reproduce.quick_parameters("01_a", quick) == {"GEN": 8, "N": 2, "QUICK": True}
    got = reproduce.quick_parameters("01_a", quick, "smollm2-135m")
    assert got == {"GEN": 4, "N": 2, "QUICK": True}


def test_a_folder_model_gets_a_file_name_safe_tag() -> None:
    assert reproduce.model_slug("smollm2-135m") == "smollm2-135m"
    assert reproduce.model_slug("/home/u/models/My Model v2/") == "My-Model-v2"
    assert reproduce.Job(reproduce.Path("01_a.ipynb"), "org/name").name == "01_a@name"


def test_figures_of_a_model_run_carry_its_tag(monkeypatch) -> None:
    monkeypatch.delenv("LABKIT_VARIANT", raising=False)
    assert plotting.variant_name("01_kv_cache-latency") == "01_kv_cache-latency"
    monkeypatch.setenv("LABKIT_VARIANT", "smollm2-135m")
    assert plotting.variant_name("01_kv_cache-latency") == "01_kv_cache-latency--smollm2-135m"


def test_a_model_run_takes_its_full_parameters_from_models_yml(tmp_path) -> None:
    nb = tmp_path / "01_a.ipynb"
    nb.write_text('{"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, '
                  '"source": "MODEL = \\"tiny-llama\\"\\nGEN = 64\\nN = 7\\nQUICK = False", '
                  '"outputs": [], "execution_count": null}], "metadata": {}, '
                  '"nbformat": 4, "nbformat_minor": 5}')
    (tmp_path / "models.yml").write_text("01_a: {smollm2-135m: {GEN: 16}, other: null}\n")
    (tmp_path / "quick.yml").write_text("01_a: {N: 2}\n01_a@smollm2-135m: {GEN: 4}\n")
    assert reproduce.model_runs("01_a", tmp_path / "models.yml") == ["smollm2-135m", "other"]
    full = reproduce.job_parameters(reproduce.Job(nb, "smollm2-135m"), quick=False)
    assert full == {"GEN": 16, "MODEL": "smollm2-135m"}
    assert reproduce.job_parameters(reproduce.Job(nb, "other"), quick=False) == {"MODEL": "other"}
    assert reproduce.job_parameters(reproduce.Job(nb), quick=False) == {}
    quick = reproduce.job_parameters(reproduce.Job(nb, "smollm2-135m"), quick=True)
    assert quick == {"GEN": 4, "N": 2, "QUICK": True, "MODEL": "smollm2-135m"}
    (tmp_path / "models.yml").write_text("01_a: {smollm2-135m: [GEN, 16]}\n")
    with pytest.raises(ValueError, match=r"models.yml: '01_a' -> 'smollm2-135m': expected a mapping"):
        reproduce.model_runs("01_a", tmp_path / "models.yml")
