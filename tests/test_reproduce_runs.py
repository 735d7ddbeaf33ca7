"""`labkit reproduce` is one run: its notebooks' records carry its run id, and the run registry
says which notebooks finished ok (real papermill subprocesses in a temporary lab root)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from labkit.core import env, results
from labkit.lab import reproduce

RECORDS = """
from labkit.core import results
results.record("01_rec", "m", float(N), "ms", threads=1)
"""


def _notebook(path: Path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("QUICK = False\nN = 3")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# test"), params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.mark.slow
def test_reproduce_hands_one_run_id_to_every_notebook(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("LABKIT_ROOT", str(root))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    monkeypatch.delenv(results.RUN_ID_ENV, raising=False)  # restored after: reproduce sets them
    monkeypatch.delenv(results.RUN_LOADAVG_ENV, raising=False)
    _notebook(root / "notebooks" / "01_rec.ipynb", RECORDS)
    _notebook(root / "notebooks" / "02_rec_then_fail.ipynb",
              RECORDS.replace("01_rec", "02_rec_then_fail") + "raise RuntimeError('boom')")
    runs = reproduce.reproduce(quick=True, timeout=120, progress=False)
    assert [r.status for r in runs] == ["ok", "failed"]
    run_id = results.current_run()[0]  # reproduce made this process's run its own
    out = root / "build" / "quick" / "data" / "results"
    rec = json.loads((out / "01_rec" / f"{env.machine_id()}.jsonl").read_text())
    assert rec["run_id"] == run_id and rec["threads"] == 1 and rec["value"] == 1.0 * 3
    registry = json.loads((out / "machines" / f"{env.machine_id()}.runs.json").read_text())
    studies = registry[run_id]["studies"]
    assert {k: v["status"] for k, v in studies.items()} == {"01_rec": "ok",
                                                           "02_rec_then_fail": "failed"}
