"""The KV cache: what a decoder keeps so each new token attends to the past without recomputing it.

Two things live here:

* ``kv_cache_bytes`` — the one source of truth for how much memory a cache takes
  (2 tensors, K and V, x layers x KV heads x head_dim x positions x bytes per element x batch).
  Notebooks, tests and the CLI call it instead of writing the formula again.
* ``KVCache`` — a contiguous, preallocated cache: per layer one K and one V tensor of shape
  ``[batch, n_kv_heads, max_len, head_dim]``. Decoding writes the new position in place, so the
  decode loop allocates nothing per token for the cache.

The cache protocol the models use (so a paged cache in another module can stand in):

* ``cache.length`` — positions already filled; the new tokens get positions from here on.
* ``cache.update(layer, k, v)`` — store ``k, v`` (``[B, n_kv_heads, T, head_dim]``) at positions
  ``[length, length + T)`` of ``layer`` and return K and V of all filled positions including the
  new ones. It does NOT move ``length``: every layer of one forward writes the same positions.
* ``cache.advance(T)`` — called by the model once per forward, after the last layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is heavy; keep `import labkit.inference.kv_cache` light for the formula
    import torch


def kv_cache_bytes(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    positions: int,
    bytes_per_element: float,
    batch: int = 1,
) -> int:
    """Bytes of K and V for ``positions`` tokens: 2 x layers x kv_heads x head_dim x positions x bytes x batch.

    ``bytes_per_element`` may be fractional (e.g. 0.5 for a 4-bit cache); the result is rounded
    up to whole bytes.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("batch", batch),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"kv_cache_bytes: {name} must be a positive integer, got {value!r}")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 0:
        raise ValueError(f"kv_cache_bytes: positions must be an integer >= 0, got {positions!r}")
    if not bytes_per_element > 0:
        raise ValueError(
            f"kv_cache_bytes: bytes_per_element must be > 0, got {bytes_per_element!r}"
        )
    elements = 2 * num_layers * num_kv_heads * head_dim * positions * batch
    exact = elements * bytes_per_element
    return int(exact) if float(exact).is_integer() else int(exact) + 1


def _config_get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def kv_cache_bytes_for_config(
    cfg_or_hf_dict: Any, positions: int, dtype_bytes: float = 2, batch: int = 1
) -> int:
    """``kv_cache_bytes`` from a model config alone (a config.json dict or a config object).

    Reads Llama/Phi/Mistral-style keys: ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads`` (defaults to the number of heads: no GQA), ``head_dim`` (defaults to
    ``hidden_size / num_attention_heads``).
    """
    layers = _config_get(cfg_or_hf_dict, "num_hidden_layers")
    heads = _config_get(cfg_or_hf_dict, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(
            "kv_cache_bytes_for_config: config needs num_hidden_layers and num_attention_heads"
        )
    kv_heads = _config_get(cfg_or_hf_dict, "num_key_value_heads") or heads
    head_dim = _config_get(cfg_or_hf_dict, "head_dim")
    if head_dim is None:
        hidden = _config_get(cfg_or_hf_dict, "hidden_size")
        if hidden is None or hidden % heads:
            raise ValueError(
                "kv_cache_bytes_for_config: config needs head_dim, or a hidden_size divisible by "
                f"num_attention_heads (got hidden_size={hidden!r}, heads={heads!r})"
            )
        head_dim = hidden // heads
    return kv_cache_bytes(
        num_layers=int(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        positions=positions,
        bytes_per_element=dtype_bytes,
        batch=batch,
    )


@runtime_checkable
class Cache(Protocol):
    """What ``Llama.forward`` and ``Phi.forward`` need from a cache (see the module docstring)."""

    @property
    def length(self) -> int: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, num_tokens: int) -> None: ...


class KVCache:
    """A contiguous cache preallocated for ``max_len`` positions (the simplest correct layout)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        import torch

        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("max_len", max_len),
            ("batch", batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}")
        shape = (batch, num_kv_heads, max_len, head_dim)
        dtype = dtype or torch.float32
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._length = 0

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        max_len: int | None = None,
        batch: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache shaped for ``model`` (anything with a ``.config`` like LlamaConfig).

        ``max_len`` defaults to the model's ``max_position_embeddings``; dtype and device default
        to those of the model's parameters.
        """
        cfg = model.config
        param = next(model.parameters())
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            max_len=max_len or cfg.max_position_embeddings,
            batch=batch,
            dtype=dtype or param.dtype,
            device=device or param.device,
        )

    @property
    def length(self) -> int:
        """Positions filled so far (the position of the next token)."""
        return self._length

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` at positions [length, length+T) of ``layer``; return the filled prefix.

        The returned tensors are views into the preallocated buffers (no copy).
        """
        start = self._length
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: {end} positions needed but the cache holds max_len={self.max_len}; "
                "allocate a larger cache"
            )
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (the model calls this after its last layer)."""
        if self._length + num_tokens > self.max_len:
            raise ValueError(f"KVCache: cannot advance past max_len={self.max_len}")
        self._length += num_tokens

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated; stale values are never read)."""
        self._length = 0

    def nbytes(self) -> int:
        """Bytes actually allocated by the K and V buffers (all ``max_len`` positions)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def __repr__(self) -> str:
        b, h, n, d = self.k[0].shape
        return (
            f"KVCache(layers={self.num_layers}, batch={b}, kv_heads={h}, head_dim={d}, "
            f"length={self._length}/{n}, dtype={self.k[0].dtype})"
        )
