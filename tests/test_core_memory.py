"""labkit.core.memory: peak bytes of one call, read from the allocator that served it.

Bounds: a 1 Mi-element float32 tensor is 4 MiB exactly; the allocator may add a little
bookkeeping (a few KiB), so each peak must lie within 64 KiB above what the tensors need.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from labkit.core.memory import peak_bytes, peak_cpu_bytes, peak_mlx_bytes
from labkit.models import attention_mlx

MIB4 = 4 * 1024 * 1024
SLACK = 64 * 1024


def test_peak_cpu_bytes_sees_allocations_and_frees() -> None:
    """``ones`` (4 MiB) and ``+ 1`` (4 MiB) are live together, then ``ones`` is freed."""
    peak, result = peak_cpu_bytes(lambda: torch.ones(1024 * 1024) + 1)
    assert result.nbytes == MIB4
    assert 2 * MIB4 <= peak < 2 * MIB4 + SLACK


def test_peak_cpu_bytes_does_not_count_inputs() -> None:
    x = torch.ones(1024 * 1024)
    peak, _ = peak_cpu_bytes(lambda: x * 2)
    assert MIB4 <= peak < MIB4 + SLACK


def test_peak_cpu_bytes_refuses_a_call_without_allocations() -> None:
    with pytest.raises(RuntimeError, match="no CPU memory events"):
        peak_cpu_bytes(lambda: None)


def test_peak_bytes_dispatches_by_device() -> None:
    peak, _ = peak_bytes(lambda: torch.ones(1024 * 1024), "cpu")
    assert MIB4 <= peak < MIB4 + SLACK
    with pytest.raises(NotImplementedError, match="MPS"):
        peak_bytes(lambda: None, "mps")
    with pytest.raises(ValueError, match="device"):
        peak_bytes(lambda: None, "tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: needs a CUDA GPU")
def test_peak_bytes_on_cuda_counts_the_output() -> None:
    peak, _ = peak_bytes(lambda: torch.ones(1024 * 1024, device="cuda"), "cuda")
    assert MIB4 <= peak < MIB4 + SLACK


_MLX_MISSING = attention_mlx.available()


@pytest.mark.skipif(_MLX_MISSING is not None, reason=f"skipped: {_MLX_MISSING}")
def test_peak_mlx_bytes_evaluates_and_counts_the_result() -> None:
    import mlx.core as mx
    import numpy as np

    peak, result = peak_mlx_bytes(lambda: mx.ones((1024 * 1024,)) + 1)
    assert np.array(result)[:3].tolist() == [2.0, 2.0, 2.0]
    assert MIB4 <= peak < 2 * MIB4 + SLACK  # the result, and at most the ones it came from


def test_importing_core_memory_leaves_torch_unloaded() -> None:
    code = "import labkit.core.memory, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
