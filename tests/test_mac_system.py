"""The macOS branches of the machine: fingerprint, sysctl, peak RSS, OpenMP beside torch,
torch.compile, llama.cpp's devices and its C reference. Skipped off macOS with "needs macOS 14".
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import needs_macos

from labkit.core import env

pytestmark = needs_macos((14, 0), "make setup on an Apple-silicon Mac")


def test_the_fingerprint_of_an_apple_silicon_mac() -> None:
    fp = env.fingerprint()
    assert fp["system"] == "Darwin" and fp["arch"] == "arm64"
    assert fp["apple_chip"].startswith("Apple M"), fp["apple_chip"]
    assert fp["gpu_cores"] > 0 and fp["gpu"] == f"Apple GPU, {fp['gpu_cores']} cores"
    assert fp["cores_performance"] > 0 and fp["cores_efficiency"] is not None
    assert {"L1d", "L2"} <= set(fp["caches"]) and "L3" not in fp["caches"]
    assert env.macos_version() >= (14, 0)
    assert env.hardware_id(fp) == fp["machine_id"]


def test_sysctl_by_its_full_path() -> None:
    assert int(env._sysctl("hw.memsize")) > 2**30


def test_peak_rss_on_macos_is_in_bytes() -> None:
    from labkit.runtimes.base import peak_rss_bytes

    a = np.ones(2**28, np.uint8)
    assert peak_rss_bytes() > a.nbytes


def test_faiss_and_scikit_learn_beside_torch_in_one_process() -> None:
    """Three libomp copies in one process: labkit's guard, then faiss on one OpenMP thread."""
    code = (
        "import torch; torch.set_num_threads(2); (torch.ones(512, 512) @ torch.ones(512, 512)).sum()\n"
        "from labkit.core import env; print(env.openmp_guard())\n"
        "import numpy as np, faiss; faiss.omp_set_num_threads(1)\n"
        "x = np.random.default_rng(0).standard_normal((1000, 64)).astype('float32')\n"
        "index = faiss.IndexFlatIP(64); index.add(x); print(index.search(x[:5], 3)[1][:, 0].tolist())\n"
        "from sklearn.cluster import KMeans; KMeans(4, n_init=1, random_state=0).fit(x)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[0, 1, 2, 3, 4]" in done.stdout


def test_torch_compile_on_the_mac_cpu() -> None:
    import torch

    from labkit.runtimes.torch_rt import macos_openmp_missing

    reason = macos_openmp_missing()
    if reason is not None:
        pytest.skip(reason)
    f = torch.compile(lambda x: x.sin() + 1)
    assert torch.allclose(f(torch.ones(4)), torch.ones(4).sin() + 1)


def test_llamacpp_sees_metal_and_its_rows_stay_on_the_cpu(tmp_path) -> None:
    pytest.importorskip("xllamacpp")
    import xllamacpp

    from labkit.runtimes.llamacpp_rt import server_params

    names = [d["name"] for d in xllamacpp.get_device_info()]
    assert "CPU" in names
    params = server_params(tmp_path / "x.gguf", n_ctx=64)
    assert params.n_gpu_layers == 0


def test_llamacpp_offloads_no_op_to_metal(tmp_path) -> None:
    pytest.importorskip("xllamacpp")
    from labkit.runtimes.llamacpp_rt import server_params

    assert server_params(tmp_path / "x.gguf", n_ctx=64).no_op_offload is True


def test_ggmls_c_reference_is_found_on_macos() -> None:
    import ctypes
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("xllamacpp")
    libs = [p for d in spec.submodule_search_locations for p in Path(d).glob("xllamacpp*.so")]
    assert libs, "no xllamacpp extension module"
    assert hasattr(ctypes.CDLL(str(libs[0])), "quantize_row_q4_K_ref")
