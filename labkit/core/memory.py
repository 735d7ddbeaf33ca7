"""Peak memory of one call, measured by the allocator that served it (torch CPU, CUDA, MLX).

Why measured and not computed: the claim "tiled attention needs O(N) memory, naive O(N^2)"
(notebook 06) is only as good as the counter behind it, and a formula would just restate the
claim. Each function runs ``fn()`` once and returns ``(peak bytes above what was live before the
call, fn's result)``: inputs that already exist are not counted, the output is.

Why not peak RSS of a subprocess: the interpreter and torch's own hundreds of MB would drown the
few MB a tiled forward needs.

torch and mlx are imported inside the functions, so ``import labkit.core`` stays light.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["peak_bytes", "peak_cpu_bytes", "peak_mlx_bytes"]


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` once and return (peak bytes the torch CPU allocator held, ``fn``'s result).

    ``torch.profiler`` with ``profile_memory=True`` logs every allocation and free that passes
    through PyTorch's CPU allocator (including scratch buffers that fused kernels allocate
    internally), each with its size and time stamp. Replaying them in time order and keeping the
    running total gives the high-water mark of memory allocated *during* the call.

    Only CPU tensors are seen. On CUDA use :func:`peak_bytes` (the caching allocator's counter).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # kineto prints a line to fd 2 on every start and stop
        prof.start()
    try:
        result = fn()
    finally:
        with _stderr_silenced():
            prof.stop()

    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    if not events:
        raise RuntimeError(
            "torch.profiler recorded no CPU memory events; peak_cpu_bytes cannot measure this "
            "function (did it allocate no CPU tensors?)"
        )
    events.sort(key=lambda e: e[0])  # stable: same-time events keep the order logged
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result


def peak_bytes(fn: Callable[[], Any], device: str) -> tuple[int, Any]:
    """Peak bytes allocated while ``fn()`` ran on torch ``device``; returns (bytes, result).

    ``"cpu"``: :func:`peak_cpu_bytes` (the profiler's allocation log). ``"cuda"``/``"cuda:N"``:
    the caching allocator's own high-water mark (``torch.cuda.max_memory_allocated``), above what
    was allocated before the call. ``"mps"`` has no peak counter in torch (only the current
    total), so it raises NotImplementedError with that reason rather than guess.
    """
    if device == "cpu":
        return peak_cpu_bytes(fn)
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        target = torch.device(device)
        torch.cuda.synchronize(target)
        before = torch.cuda.memory_allocated(target)
        torch.cuda.reset_peak_memory_stats(target)
        result = fn()
        torch.cuda.synchronize(target)
        return torch.cuda.max_memory_allocated(target) - before, result
    if device == "mps":
        raise NotImplementedError(
            "torch.mps has no peak-memory counter (only current_allocated_memory), so peak "
            "bytes during one call cannot be measured on MPS"
        )
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}")


def peak_mlx_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()``, evaluate its result, and return (MLX's peak allocated bytes, result).

    MLX is lazy, so the result is evaluated inside the measurement. Measured by MLX's allocator
    (``mx.reset_peak_memory`` / ``mx.get_peak_memory``), above the memory already active before
    the call. Its cache is cleared first so that buffers kept from earlier calls are not reused
    unseen. Two runs of the same code can still differ by a few bytes.
    """
    import mlx.core as mx

    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    result = fn()
    mx.eval(result)
    return mx.get_peak_memory() - before, result


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (C++ logs bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
