"""Runtime adapters for the benchmark matrix (notebook 08, ``labkit bench runtimes``).

One module per runtime; every adapter implements :class:`labkit.runtimes.base.Runtime`
(``available()`` -> None or the reason, ``load``, ``prefill``, ``decode_step``). The registry
maps names to "module:Class" so that listing runtimes imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from labkit.runtimes.base import Runtime

#: runtime name -> "module:Class"; the order is the order of the matrix's rows
RUNTIMES: dict[str, str] = {
    "torch-eager": "labkit.runtimes.torch_rt:TorchEager",
    "torch-fast": "labkit.runtimes.torch_rt:TorchFast",
    "torch-compile": "labkit.runtimes.torch_rt:TorchCompile",
    "torch-cuda": "labkit.runtimes.torch_rt:TorchCuda",
    "onnxruntime": "labkit.runtimes.onnx_rt:OnnxRuntime",
    "mlx": "labkit.runtimes.mlx_rt:MlxRuntime",
    "llama.cpp-f32": "labkit.runtimes.llamacpp_rt:LlamaCppF32",
    "llama.cpp-f16": "labkit.runtimes.llamacpp_rt:LlamaCppF16",
    "llama.cpp-q8_0": "labkit.runtimes.llamacpp_rt:LlamaCppQ8_0",
    "llama.cpp-q4_0": "labkit.runtimes.llamacpp_rt:LlamaCppQ4_0",
    "llama.cpp-server": "labkit.runtimes.llamacpp_server_rt:LlamaCppServer",
    "swift": "labkit.runtimes.swift_rt:SwiftPort",
    "coreml": "labkit.runtimes.coreml_rt:CoreML",
    "openvino": "labkit.runtimes.openvino_rt:OpenVINO",
    "openvino-int8": "labkit.runtimes.openvino_rt:OpenVINOInt8",
    "openvino-int4": "labkit.runtimes.openvino_rt:OpenVINOInt4",
    "vllm-cpu": "labkit.runtimes.vllm_rt:VLLM",
}


def runtime_class(name: str) -> type[Runtime]:
    """The adapter class registered as ``name`` (KeyError listing the known names)."""
    if name not in RUNTIMES:
        raise KeyError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str, **kwargs) -> Runtime:
    """An instance of the adapter ``name`` (not loaded yet)."""
    return runtime_class(name)(**kwargs)
