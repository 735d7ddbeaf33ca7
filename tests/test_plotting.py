"""labkit.core.plotting: house style, figure checks, atomic PNG+SVG with provenance.

Figures go to tmp_path through LABKIT_ROOT, never into the real figures/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import labkit
from labkit.core import env, paths, plotting


@pytest.fixture(autouse=True)
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    plt.switch_backend("Agg")  # headless, whatever the machine's default
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)  # would redirect the writes
    monkeypatch.delenv("LABKIT_NOTEBOOK", raising=False)
    monkeypatch.delenv("LABKIT_PARAMS", raising=False)
    yield tmp_path
    plt.close("all")


def good_figure() -> tuple:
    fig, ax = plotting.new_figure()
    ax.plot([1, 2, 4], [3.0, 1.0, 2.0], marker="o", label="copy")
    ax.set_title("Copy bandwidth")
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel("bandwidth (GB/s)")
    return fig, ax


def test_use_style_sets_house_rcparams() -> None:
    plotting.use_style()
    assert matplotlib.rcParams["figure.dpi"] == 110
    assert matplotlib.rcParams["savefig.dpi"] == 150
    assert matplotlib.rcParams["axes.grid"] is True
    assert matplotlib.rcParams["figure.constrained_layout.use"] is True
    assert matplotlib.rcParams["svg.hashsalt"] == plotting.SVG_HASH_SALT


def test_new_figure_returns_axes_grid() -> None:
    fig, axes = plotting.new_figure(2, 3)
    assert axes.shape == (2, 3) and len(fig.get_axes()) == 6


def test_save_figure_writes_png_and_svg_with_provenance(lab_root: Path) -> None:
    fig, _ = good_figure()
    png, svg = plotting.save_figure(fig, "00_tour-copy", notebook="00_tour", params={"quick": True})
    assert png == lab_root / "figures" / "00_tour-copy.png" == paths.figures_dir() / png.name
    assert svg == png.with_suffix(".svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]
    expected = {
        "figure": "00_tour-copy",
        "notebook": "00_tour",
        "params": {"quick": True},
        "git_rev": "unknown",  # tmp_path is not a git checkout
        "machine": env.machine_id(),
        "labkit_version": labkit.__version__,
    }
    assert plotting.read_png_provenance(png) == expected
    assert plotting.read_svg_provenance(svg) == expected
    with Image.open(png) as img:
        assert img.info["dpi"] == pytest.approx((150, 150), abs=0.5)
    assert sorted(p.name for p in png.parent.iterdir()) == [png.name, svg.name]  # no temp left


def test_provenance_defaults_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_NOTEBOOK", "01_kv_cache")
    monkeypatch.setenv("LABKIT_PARAMS", json.dumps({"MODEL": "tiny-llama", "QUICK": True}))
    png, _ = plotting.save_figure(good_figure()[0], "01_kv_cache-bytes")
    info = plotting.read_png_provenance(png)
    assert info["notebook"] == "01_kv_cache"
    assert info["params"] == {"MODEL": "tiny-llama", "QUICK": True}


def test_bad_labkit_params_env_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABKIT_PARAMS", "{not json")
    with pytest.raises(ValueError, match="LABKIT_PARAMS"):
        plotting.save_figure(good_figure()[0], "x")


def test_unserialisable_params_refused() -> None:
    with pytest.raises(ValueError, match="params"):
        plotting.save_figure(good_figure()[0], "x", params={"f": object()})


def test_svg_is_deterministic() -> None:
    fig, _ = good_figure()
    _, svg = plotting.save_figure(fig, "same")
    first = svg.read_bytes()
    _, svg = plotting.save_figure(fig, "same")
    assert svg.read_bytes() == first
    assert b"<dc:date>" not in first


@pytest.mark.parametrize("name", ["", "a/b", "../up", "fig.png", "fig.svg", "with space", None])
def test_bad_names_refused(name: object, lab_root: Path) -> None:
    with pytest.raises(ValueError, match="name must be a file stem"):
        plotting.save_figure(good_figure()[0], name)  # type: ignore[arg-type]
    assert not (lab_root / "figures").exists()


def test_missing_title_refused_and_nothing_written(lab_root: Path) -> None:
    fig, ax = good_figure()
    ax.set_title("")
    with pytest.raises(ValueError, match="axes 0 has no title"):
        plotting.save_figure(fig, "untitled")
    assert not (lab_root / "figures").exists()


def test_suptitle_counts_as_title() -> None:
    fig, ax = good_figure()
    ax.set_title("")
    fig.suptitle("Copy bandwidth on this machine")
    plotting.save_figure(fig, "suptitled")


@pytest.mark.parametrize("axis", ["x", "y"])
def test_missing_axis_label_refused(axis: str) -> None:
    fig, ax = good_figure()
    getattr(ax, f"set_{axis}label")("")
    with pytest.raises(ValueError, match=rf"axes 0 \('Copy bandwidth'\) has no {axis} label"):
        plotting.save_figure(fig, "unlabelled")


def test_each_plotted_axes_is_checked() -> None:
    fig, (left, right) = plotting.new_figure(1, 2)
    left.plot([0, 1], [0, 1])
    left.set(title="left", xlabel="x (s)", ylabel="y (ms)")
    right.plot([0, 1], [1, 0])
    right.set(xlabel="x (s)", ylabel="y (ms)")
    with pytest.raises(ValueError, match="axes 1 has no title"):
        plotting.save_figure(fig, "two")


def test_shared_axes_and_figure_labels_count() -> None:
    fig, (top, bottom) = plotting.new_figure(2, 1, sharex=True)
    for ax, name in ((top, "top"), (bottom, "bottom")):
        ax.plot([0, 1], [0, 1])
        ax.set_title(name)
    bottom.set_xlabel("tokens")  # shared with the top axes
    fig.supylabel("latency (ms)")
    plotting.save_figure(fig, "shared")


def test_colorbar_and_hidden_axes_exempt() -> None:
    fig, axes = plotting.new_figure(1, 2)
    image = axes[0].imshow(np.arange(12.0).reshape(3, 4))
    axes[0].set(title="heat", xlabel="column", ylabel="row")
    fig.colorbar(image, ax=axes[0])
    axes[1].axis("off")  # an unused panel
    plotting.save_figure(fig, "heat")


def test_figure_without_plotted_axes_needs_a_title() -> None:
    fig, ax = plotting.new_figure()
    ax.axis("off")
    ax.table(cellText=[["1", "2"]], colLabels=["a (ms)", "b (ms)"])
    with pytest.raises(ValueError, match="no title"):
        plotting.save_figure(fig, "table")
    ax.set_title("A table")
    plotting.save_figure(fig, "table")


def test_figure_without_axes_refused() -> None:
    with pytest.raises(ValueError, match="no axes"):
        plotting.save_figure(plt.figure(), "empty")


def test_interrupted_save_keeps_old_files(monkeypatch: pytest.MonkeyPatch) -> None:
    fig, ax = good_figure()
    png, svg = plotting.save_figure(fig, "keep")
    old_png, old_svg = png.read_bytes(), svg.read_bytes()
    ax.set_title("A different title")

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash during replace")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="simulated crash"):
            plotting.save_figure(fig, "keep")
    assert png.read_bytes() == old_png and svg.read_bytes() == old_svg
    assert sorted(p.name for p in png.parent.iterdir()) == ["keep.png", "keep.svg"]


def test_read_png_provenance_refuses_plain_png(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(path)
    with pytest.raises(ValueError, match="no labkit provenance"):
        plotting.read_png_provenance(path)


def test_format_bytes():
    from labkit.core.plotting import format_bytes

    assert format_bytes(16384) == "16 KiB"
    assert format_bytes(2**20) == "1 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3 GiB"
    assert format_bytes(100) == "100 B"


def test_a_title_too_wide_for_the_figure_is_wrapped_not_cut(lab_root: Path) -> None:
    fig, ax = good_figure()
    long = "a user's model with a very long folder name: " + "word " * 40
    ax.set_title(long)
    fig.suptitle("and a suptitle that runs on and on " * 4)
    plotting.save_figure(fig, "01_kv_cache-long-title")  # the house check passes after wrapping
    assert "\n" in ax.get_title() and ax.get_title().split() == long.split()
    assert "\n" in fig._suptitle.get_text()
    short, ax2 = good_figure()
    before = ax2.get_title()
    plotting.save_figure(short, "01_kv_cache-short-title")
    assert ax2.get_title() == before  # a title that fits is left alone
