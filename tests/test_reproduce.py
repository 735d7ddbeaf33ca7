"""The headless runner: discovery, quick parameters, failure handling, summary, exit code.

These run real papermill subprocesses on tiny notebooks written into a temporary lab root
(LABKIT_ROOT), so nothing touches the repository's figures/ or data/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbformat
import pytest

from labkit.lab import reproduce


def _write_notebook(path: Path, body: str, params: str = "QUICK = False\nN = 3") -> None:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), p, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def lab(tmp_path, monkeypatch):
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("LABKIT_ROOT", str(root))
    return root


GOOD = """
from pathlib import Path
import os, json
root = Path(os.environ["LABKIT_ROOT"])
from labkit.core import paths
paths.figures_dir().mkdir(parents=True, exist_ok=True)
(paths.figures_dir() / "01_good-n.png").write_text(str(N))
(root / "seen.json").write_text(json.dumps({"N": N, "QUICK": QUICK, "nb": os.environ["LABKIT_NOTEBOOK"]}))
from labkit.core.skips import skip
skip("Core ML prediction", "needs macOS")
"""


def test_discover_orders_and_filters(lab):
    for name in ("02_b.ipynb", "01_a.ipynb", "notes.ipynb", "10_c.ipynb"):
        _write_notebook(lab / "notebooks" / name, "pass")
    assert [p.stem for p in reproduce.discover()] == ["01_a", "02_b", "10_c"]
    assert [p.stem for p in reproduce.discover("02")] == ["02_b"]
    assert [p.stem for p in reproduce.discover("0[12]_*")] == ["01_a", "02_b"]
    assert [p.stem for p in reproduce.discover("01,10")] == ["01_a", "10_c"]


def test_quick_parameters_from_one_file(lab):
    (lab / "notebooks" / "quick.yml").write_text("01_good:\n  N: 1\n")
    assert reproduce.quick_parameters("01_good") == {"N": 1, "QUICK": True}
    assert reproduce.quick_parameters("02_other") == {"QUICK": True}
    (lab / "notebooks" / "quick.yml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="quick.yml"):
        reproduce.quick_parameters("01_good")


@pytest.mark.slow
def test_failing_notebook_runs_others_and_exits_nonzero(lab, capsys):
    nbdir = lab / "notebooks"
    (nbdir / "quick.yml").write_text("01_good:\n  N: 1\n")
    _write_notebook(nbdir / "01_good.ipynb", GOOD)
    _write_notebook(nbdir / "02_bad.ipynb", "raise RuntimeError('boom in cell')")
    _write_notebook(nbdir / "03_after.ipynb", "x = 1")
    # An earlier figure of the failing notebook must survive the failed run.
    (lab / "figures").mkdir()
    (lab / "figures" / "02_bad-old.png").write_text("earlier")

    args = argparse.Namespace(quick=True, only=None, jobs=1, timeout=120)
    code = reproduce.main_from_args(args)

    assert code == 1
    summary = json.loads((lab / "build" / "reproduce-summary.json").read_text())
    status = {n["name"]: n["status"] for n in summary["notebooks"]}
    assert status == {"01_good": "ok", "02_bad": "failed", "03_after": "ok"}
    bad = next(n for n in summary["notebooks"] if n["name"] == "02_bad")
    assert "boom in cell" in bad["error"]
    good = next(n for n in summary["notebooks"] if n["name"] == "01_good")
    assert good["figures"] == ["01_good-n.png"]
    # quick runs write figures under build/quick, never over the committed full-run figures
    assert (lab / "build" / "quick" / "figures" / "01_good-n.png").read_text() == "1"
    assert not (lab / "figures" / "01_good-n.png").exists()
    assert good["skipped"] == [{"part": "Core ML prediction", "reason": "needs macOS"}]
    # quick parameters were injected, and the notebook knew its own name
    assert json.loads((lab / "seen.json").read_text()) == {"N": 1, "QUICK": True, "nb": "01_good"}
    assert (lab / "figures" / "02_bad-old.png").read_text() == "earlier"
    # executed copies land in build/notebooks, the failing one too (it holds the traceback)
    assert (lab / "build" / "notebooks" / "01_good.ipynb").exists()
    assert (lab / "build" / "notebooks" / "02_bad.ipynb").exists()
    assert "1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_timeout_is_a_failure(lab):
    _write_notebook(lab / "notebooks" / "01_slow.ipynb", "import time\ntime.sleep(60)")
    runs = reproduce.reproduce(quick=False, timeout=15, progress=False)
    assert [r.status for r in runs] == ["timeout"]


def test_default_parameters_read_from_the_parameters_cell(lab):
    path = lab / "notebooks" / "01_p.ipynb"
    _write_notebook(path, "pass", params="QUICK = False\nN = 3\nSIZES = [1, 2]\nX = len(SIZES)")
    assert reproduce.default_parameters(path) == {"QUICK": False, "N": 3, "SIZES": [1, 2]}


def test_no_match_is_an_error(lab):
    args = argparse.Namespace(quick=False, only="99", jobs=1, timeout=None)
    assert reproduce.main_from_args(args) == 2


def test_jobs_must_be_positive(lab):
    with pytest.raises(ValueError, match="jobs"):
        reproduce.reproduce(jobs=0)


def test_kernel_is_this_interpreter_even_when_a_user_spec_shadows_it(tmp_path, monkeypatch):
    """A 'labkit' kernelspec in the user's Jupyter folder (another venv's, or a stale one) must not
    run the notebooks: the runner's own spec comes first on JUPYTER_PATH and names this venv's
    python unresolved (a venv's python is a symlink to the base interpreter)."""
    import os
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    user = tmp_path / "user-data" / "kernels" / reproduce.KERNEL_NAME
    user.mkdir(parents=True)
    (user / "kernel.json").write_text(json.dumps(
        {"argv": ["/elsewhere/.venv/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "stale", "language": "python"}))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user-data"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    name = reproduce.ensure_kernel()
    assert KernelSpecManager().get_kernel_spec(name).argv[0] == "/elsewhere/.venv/bin/python"  # the trap
    for key, value in reproduce.kernel_env(dict(os.environ)).items():
        monkeypatch.setenv(key, value)
    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == os.path.abspath(sys.executable)
    assert reproduce.ensure_kernel() == name  # idempotent


def test_kernel_dir_falls_back_to_the_user_cache_for_a_read_only_prefix(tmp_path, monkeypatch):
    import os
    import sys

    assert reproduce.kernel_dir().parent.parent == Path(sys.prefix)  # a writable venv
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert reproduce.kernel_dir().is_relative_to(tmp_path / ".cache" / "labkit")
