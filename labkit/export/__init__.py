"""Exporters: one module per target format (gguf.py for llama.cpp, onnx.py for ONNX Runtime).

Each imports its heavy library (gguf, torch.onnx) inside the function that needs it, so
``import labkit.export`` stays light.
"""
