"""labkit.core.plotting's figure check beyond titles and labels: text cut off at the figure's
edge, legend entries drawn alike, byte axes ticked at sizes nobody allocates; and the byte axis
(BytesLocator + BytesFormatter) that ticks at round binary sizes."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pytest

from labkit.core import plotting

MIB, GIB = 2**20, 2**30


@pytest.fixture(autouse=True)
def headless() -> Iterator[None]:
    plt.switch_backend("Agg")
    yield
    plt.close("all")


def labelled(title: str = "Copy bandwidth", **kw: object) -> tuple:
    fig, ax = plotting.new_figure(**kw)
    ax.set_title(title)
    ax.set_xlabel("buffer (bytes)")
    ax.set_ylabel("bandwidth (GB/s)")
    return fig, ax


def test_a_title_wider_than_the_figure_is_refused() -> None:
    fig, ax = labelled("A title far too long for a figure this narrow, " * 3, figsize=(3, 2))
    ax.plot([1, 2], [1, 2])
    with pytest.raises(ValueError, match=r"runs off the figure's left/right edge"):
        plotting.check_figure(fig)


def test_a_legend_outside_the_canvas_is_refused() -> None:
    fig, ax = labelled()
    ax.plot([1, 2], [1, 2], label="a runtime with a long name")
    ax.legend(loc="upper left", bbox_to_anchor=(1.4, 1.0))
    with pytest.raises(ValueError, match=r"'a runtime with a long name' runs off"):
        plotting.check_figure(fig)


def test_text_inside_or_clipped_to_the_axes_passes() -> None:
    fig, ax = labelled()
    ax.plot([1, 2], [1, 2], label="measured")
    ax.text(1.5, 1.5, "a note")
    ax.text(50.0, 1.5, "clipped away", clip_on=True)  # clipped to the axes: never cut by the edge
    ax.legend()
    plotting.check_figure(fig)


def test_repeated_colours_in_one_legend_are_refused() -> None:
    fig, ax = labelled()
    for i in range(len(plotting.COLORS) + 1):  # the 9th line wraps round to the 1st colour
        ax.plot([0, 1], [i, i + 1], label=f"runtime {i}")
    ax.legend(ncols=3, fontsize=7)
    with pytest.raises(ValueError, match=r"'runtime 0' and 'runtime 8' are drawn alike"):
        plotting.check_figure(fig)


def test_same_colour_in_another_style_or_as_a_band_is_distinct() -> None:
    fig, ax = labelled()
    ax.plot([0, 1], [0, 1], color="C0", label="measured")
    ax.plot([0, 1], [0, 2], color="C0", linestyle="--", label="published")
    ax.fill_between([0, 1], [0, 0], [1, 1], color="C0", alpha=0.25, label="p10-p90")
    ax.bar([0.5], [1], color="C1", label="bars")
    ax.bar([0.7], [1], color="C1", hatch="//", label="hatched bars")
    ax.legend()
    plotting.check_figure(fig)


def test_decimal_ticks_on_a_byte_axis_are_refused() -> None:
    fig, ax = labelled()
    ax.plot([0, 1e9], [1, 2])
    ax.xaxis.set_major_formatter(plotting.bytes_formatter())  # matplotlib's decimal locator
    with pytest.raises(ValueError, match=r"x ticks at .*190.7 MiB.* not round binary sizes"):
        plotting.check_figure(fig)
    plotting.set_bytes_axis(ax.xaxis)
    plotting.check_figure(fig)
    assert all(plotting.is_round_bytes(v) for v in ax.get_xticks())


def test_a_log_byte_axis_ticks_at_powers_of_two() -> None:
    fig, ax = labelled()
    ax.plot([16 * 1024, 512 * MIB], [1, 2])
    ax.set_xscale("log", base=2)
    plotting.set_bytes_axis(ax.xaxis)
    plotting.check_figure(fig)
    ticks = [t for t in ax.get_xticks() if 16 * 1024 <= t <= 512 * MIB]
    assert all(np.log2(t) == int(np.log2(t)) for t in ticks) and len(ticks) <= 9
    assert "1 MiB" in [plotting.BytesFormatter()(t) for t in ticks]


def test_bytes_locator_steps() -> None:
    fig, ax = plotting.new_figure()
    locator = plotting.BytesLocator(numticks=8)
    ax.xaxis.set_major_locator(locator)
    assert locator.tick_values(0, 2 * GIB) == [i * 256 * MIB for i in range(9)]
    assert locator.tick_values(10 * MIB, 11 * MIB) == [10 * MIB + i * 128 * 1024 for i in range(9)]
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(locator)
    assert locator.tick_values(1, 2**40) == [2.0**k for k in range(0, 41, 6)]


@pytest.mark.parametrize(
    ("value", "round_"),
    [(0, True), (MIB, True), (1.5 * MIB, True), (48 * 1024, True), (768 * MIB, True),
     (100 * MIB, True), (1e8, False), (2e8, False), (2.5, False), (-MIB, False), (63, True),
     (65, False)],
)
def test_is_round_bytes(value: float, round_: bool) -> None:
    assert plotting.is_round_bytes(value) is round_


def test_tick_labels_never_round_their_tick() -> None:
    fmt = plotting.BytesFormatter()
    assert fmt(1.25 * GIB) == "1.25 GiB"
    assert fmt(16 * 1024) == "16 KiB" and fmt(512) == "512 B" and fmt(0) == "0"
    assert fmt(1e8) == "95.367 MiB"


def test_tick_labels_outside_the_view_do_not_count() -> None:
    fig, ax = labelled()
    ax.plot([1, 7, 65], [1e-9, 5e-7, 6e-7], label="error")
    ax.set_yscale("log")  # the locator also places 1e-10, below the view: never drawn
    plotting.check_figure(fig)


def test_text_is_checked_at_the_screen_and_the_saved_dpi(monkeypatch: pytest.MonkeyPatch) -> None:
    fig, ax = labelled()
    ax.plot([1, 2], [1, 2])
    seen = []
    draw = plotting._renderer
    monkeypatch.setattr(plotting, "_renderer", lambda f: seen.append(f.dpi) or draw(f))
    plotting.check_figure(fig)
    assert seen == [plotting.SCREEN_DPI, plotting.SAVE_DPI]
    assert fig.dpi == plotting.SCREEN_DPI  # restored
