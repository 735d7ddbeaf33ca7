"""labkit.core.timing with an injected fake clock: no sleeps, no wall-clock assertions."""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Iterable

import pytest

from labkit.core import timing
from labkit.core.timing import GenerationTiming, Stats, Timer, measure, time_generation


def fake_clock(times: Iterable[float], events: list[str] | None = None) -> Callable[[], float]:
    """A clock that returns ``times`` in order (and logs 'clock' into ``events``)."""
    it = iter(times)

    def clock() -> float:
        if events is not None:
            events.append("clock")
        return next(it)

    return clock


def test_stats_median_percentiles_mean() -> None:
    # numpy's linear interpolation on 1..10: p10 = 1 + 0.1 * 9, p90 = 1 + 0.9 * 9.
    stats = Stats.from_samples([float(v) for v in [7, 1, 10, 3, 5, 2, 9, 4, 8, 6]])
    assert stats.n == 10
    assert stats.median == pytest.approx(5.5)
    assert stats.p10 == pytest.approx(1.9)
    assert stats.p90 == pytest.approx(9.1)
    assert stats.mean == pytest.approx(5.5)
    assert stats.median_ms == pytest.approx(5500.0)
    assert stats.to_dict()["n"] == 10
    assert stats.to_dict()["samples_s"][0] == 7.0


def test_stats_odd_count_and_single_sample() -> None:
    assert Stats.from_samples([3.0, 1.0, 2.0]).median == 2.0
    one = Stats.from_samples([0.25])
    assert (one.median, one.p10, one.p90, one.n) == (0.25, 0.25, 0.25, 1)


@pytest.mark.parametrize("samples", [[], [1.0, math.nan], [math.inf]])
def test_stats_refuses_empty_or_non_finite(samples: list[float]) -> None:
    with pytest.raises(ValueError, match="samples"):
        Stats.from_samples(samples)


def test_measure_times_only_the_repeats() -> None:
    events: list[str] = []

    def fn() -> None:
        events.append("fn")

    clock = fake_clock([0.0, 1.0, 10.0, 12.0, 20.0, 23.0, 30.0, 34.0], events)
    stats = measure(fn, warmup=3, repeats=4, clock=clock)
    assert stats.samples == [1.0, 2.0, 3.0, 4.0]
    assert stats.median == pytest.approx(2.5)
    # Three untimed warm-up calls come before the first clock read.
    assert events[:4] == ["fn", "fn", "fn", "clock"]
    assert events.count("fn") == 7
    assert events.count("clock") == 8


def test_measure_syncs_before_every_clock_read() -> None:
    events: list[str] = []
    clock = fake_clock([0.0, 1.0, 2.0, 4.0], events)
    measure(lambda: events.append("fn"), warmup=1, repeats=2,
            sync=lambda: events.append("sync"), clock=clock)
    assert events == ["fn",
                      "sync", "clock", "fn", "sync", "clock",
                      "sync", "clock", "fn", "sync", "clock"]


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"repeats": 2.0}])
def test_measure_validates_counts(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        measure(lambda: None, **kwargs)


def test_device_sync_cpu_is_noop_and_bad_device_refused() -> None:
    assert timing.device_sync("cpu")() is None
    with pytest.raises(ValueError, match="device"):
        timing.device_sync("gpu")


def test_device_sync_cuda_and_mps_call_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: calls.append(dev))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    timing.device_sync("cuda:1")()
    timing.device_sync("mps")()
    assert calls == [torch.device("cuda:1"), "mps"]


def test_mlx_sync_calls_mx_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    evaluated: list[object] = []
    core = types.ModuleType("mlx.core")
    core.eval = lambda *values: evaluated.extend(values)  # type: ignore[attr-defined]
    package = types.ModuleType("mlx")
    package.core = core  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlx", package)
    monkeypatch.setitem(sys.modules, "mlx.core", core)
    value = object()
    assert timing.mlx_sync(value) is value
    assert evaluated == [value]


def test_timer_reads_clock_and_syncs() -> None:
    syncs: list[int] = []
    with Timer(clock=fake_clock([5.0, 7.5]), sync=lambda: syncs.append(1)) as t:
        assert t.seconds is None
    assert t.seconds == pytest.approx(2.5)
    assert t.ms == pytest.approx(2500.0)
    assert len(syncs) == 2


def test_timer_ms_before_end_raises() -> None:
    t = Timer(clock=fake_clock([0.0]))
    with pytest.raises(RuntimeError, match="not finished"):
        _ = t.ms


def test_time_generation_ttft_and_tpot_from_clock() -> None:
    events: list[str] = []
    clock = fake_clock([0.0, 0.5, 0.6, 0.75, 0.85], events)
    result, outputs = time_generation(
        prefill=lambda: 1, decode_step=lambda s: s + 1, n_tokens=4,
        sync=lambda: events.append("sync"), clock=clock,
    )
    assert outputs == [1, 2, 3, 4]
    assert result.ttft_s == pytest.approx(0.5)
    assert result.tpot_s == pytest.approx([0.1, 0.15, 0.1])
    assert result.total_s == pytest.approx(0.85)
    assert result.n_tokens == 4
    assert result.tpot_median_s == pytest.approx(0.1)
    assert result.tokens_per_s == pytest.approx(3 / 0.35)
    # One sync before each of the 5 clock reads.
    assert events.count("sync") == events.count("clock") == 5
    assert all(events[i] == "sync" for i in range(0, len(events), 2))


def test_time_generation_single_token_has_no_decode_steps() -> None:
    result, outputs = time_generation(lambda: "a", lambda s: s, 1, clock=fake_clock([1.0, 3.0]))
    assert outputs == ["a"]
    assert result.ttft_s == pytest.approx(2.0)
    assert result.tpot_s == []
    assert math.isnan(result.tokens_per_s) and math.isnan(result.tpot_median_s)


def test_time_generation_validates_n_tokens() -> None:
    with pytest.raises(ValueError, match="n_tokens"):
        time_generation(lambda: 0, lambda s: s, 0)


def test_generation_timing_to_dict() -> None:
    d = GenerationTiming(ttft_s=0.2, tpot_s=[0.1, 0.3], total_s=0.6, n_tokens=3).to_dict()
    assert d["tokens_per_s"] == pytest.approx(5.0)
    assert d["tpot_median_s"] == pytest.approx(0.2)
