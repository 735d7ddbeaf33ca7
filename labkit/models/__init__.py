"""Models: our readable Llama and Phi, the KV cache, generation, and one loader.

``from labkit.models import load`` is the entry point. Only light modules are imported here;
torch and transformers load when a model is built or loaded, so ``import labkit.models`` is fast.
"""

from __future__ import annotations

from labkit.models.errors import ModelLoadError
from labkit.models.loader import LoadedModel, load
from labkit.models.sizes import kv_cache_bytes, kv_cache_bytes_for_config

__all__ = ["LoadedModel", "ModelLoadError", "kv_cache_bytes", "kv_cache_bytes_for_config", "load"]
