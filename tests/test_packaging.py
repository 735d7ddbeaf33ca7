"""pyproject.toml and environment.yml list the same packages, so conda and pip users get one lab."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_matches_pyproject():
    project = _pyproject()["project"]
    wanted = {r.strip() for r in project["dependencies"]}
    wanted |= {r.strip() for r in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {r.strip() for r in pip_section if not r.startswith("-e")}
    assert listed == wanted, (
        f"only in pyproject: {sorted(wanted - listed)}; only in environment.yml: {sorted(listed - wanted)}"
    )
    assert "-e ." in pip_section, "environment.yml must install labkit itself (-e .)"


def test_extras_exist_and_all_covers_them():
    extras = _pyproject()["project"]["optional-dependencies"]
    for name in ("coreml", "mlx", "llamacpp", "onnx", "dev", "all"):
        assert name in extras, f"missing extra {name!r}"
    covered = set(re.search(r"\[(.*)\]", extras["all"][0]).group(1).split(","))
    assert covered == set(extras) - {"all"}


def test_makefile_pins_torch_and_has_targets():
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile
    for target in ("setup", "reproduce", "quick", "test", "lab", "clean"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks target {target}"
    assert re.search(r"^test: \$\(STAMP\)", makefile, re.M), "make test must create the venv itself"
    assert re.search(r"^reproduce: \$\(STAMP\)", makefile, re.M)


def test_gitignore_keeps_venv_and_build_out():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "build/" in ignored


def test_the_torch_floor_is_past_the_mps_gqa_crash():
    """Below torch 2.7 grouped-query SDPA aborts the process on MPS (``doctor.MPS_GQA_TORCH``):
    conda and ``pip install -e .`` users, off the Makefile's pin, must not get such a torch."""
    from labkit.lab.doctor import MPS_GQA_TORCH

    torch_req = next(r for r in _pyproject()["project"]["dependencies"] if _name(r) == "torch")
    floor = tuple(int(x) for x in re.search(r">=\s*([\d.]+)", torch_req).group(1).split("."))
    assert floor >= MPS_GQA_TORCH, torch_req
