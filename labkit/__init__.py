"""labkit: the shared helpers of the on-device LLM lab.

Import is light on purpose: heavy or optional libraries (torch, transformers, coremltools, mlx,
llama.cpp, onnxruntime) load inside the functions that need them.
"""

__version__ = "0.1.0"
