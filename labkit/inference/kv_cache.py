"""The KV cache: what a decoder keeps so each new token attends to the past without recomputing it.

Three caches for one sequence per row, each a ``labkit.models.layers.Cache`` the model's one
forward plugs in (``model(ids, cache=c)``), differing only in how K and V are kept:

* ``KVCache`` — contiguous and preallocated: per layer one K and one V tensor of shape
  ``[batch, n_kv_heads, max_len, head_dim]``. Decoding writes the new position in place, so the
  decode loop allocates nothing per token for the cache.
* ``ConcatKVCache`` — grows by ``torch.cat``: always exactly the right size, but every step
  copies the whole cache (what a first implementation does, and what a fixed-shape graph such as
  a Core ML stateful model cannot express).
* ``SlidingWindowKVCache`` — a ring buffer of the last ``window`` positions (Mistral's window).

``update(layer, k, v)`` stores the new positions and returns every filled one; it does NOT move
``length``: every layer of one forward writes the same positions, and the model calls
``advance(T)`` once after its last layer. The paged cache is ``labkit.inference.paged_kv_cache``;
the fixed-size caches exporters trace are ``labkit.inference.export_cache``. How many bytes a
cache takes is ``labkit.models.sizes.kv_cache_bytes`` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import torch

from labkit.core.checks import positive_int
from labkit.models.layers import Cache, SequentialCache, cache_layout
from labkit.models.sizes import kv_cache_bytes, kv_cache_bytes_for_config

__all__ = ["Cache", "ConcatKVCache", "KVCache", "SlidingWindowKVCache", "kv_cache_bytes",
           "kv_cache_bytes_for_config"]



def _kv_buffers(owner: str, num_layers: int, batch: int, num_kv_heads: int,
                slots: tuple[str, int], head_dim: int, dtype: torch.dtype | None,
                device: Any) -> tuple[list, list]:
    """Zeroed K and V ``[batch, num_kv_heads, slots, head_dim]`` per layer, sizes checked
    (``slots`` is (its parameter's name, its value): max_len, or a window)."""
    slots_name, slots = slots
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), (slots_name, slots), ("batch", batch)):
        positive_int(value, name, owner)
    shape = (batch, num_kv_heads, slots, head_dim)
    dtype = dtype or torch.float32
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])


class KVCache(SequentialCache):
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
        self.k, self.v = _kv_buffers("KVCache", num_layers, batch, num_kv_heads,
                                     ("max_len", max_len), head_dim, dtype, device)
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
        layout = cache_layout(model)
        layout["dtype"] = dtype or layout["dtype"]
        layout["device"] = device or layout["device"]
        return cls(**layout, max_len=max_len or model.config.max_position_embeddings, batch=batch)

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



class ConcatKVCache(SequentialCache):
    """A cache that grows by concatenation: each update allocates new K and V tensors one step
    longer and copies the old ones in. Simple and always exactly the right size, but every step
    copies the whole cache (O(n) bytes per token, O(n^2) over a generation) and allocates — and a
    compiled graph with fixed-shape state (Core ML's stateful models) cannot express it."""

    def __init__(self, num_layers: int) -> None:
        positive_int(num_layers, "num_layers", "ConcatKVCache")
        self.k: list[Any] = [None] * num_layers
        self.v: list[Any] = [None] * num_layers
        self._length = 0

    @classmethod
    def for_model(cls, model: Any) -> ConcatKVCache:
        return cls(model.config.num_hidden_layers)

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.contiguous(), v.contiguous()
        else:
            self.k[layer] = torch.cat((self.k[layer], k), dim=2)
            self.v[layer] = torch.cat((self.v[layer], v), dim=2)
        return self.k[layer], self.v[layer]

    def advance(self, num_tokens: int) -> None:
        self._length += num_tokens

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)
        self._length = 0


class SlidingWindowKVCache(SequentialCache):
    """Keep only the last ``window`` positions, in a ring buffer: position p lives in slot
    p mod window, so memory is fixed at ``window`` positions however long the generation runs.

    Why the slot order does not matter: keys are stored after RoPE (their position is already
    baked in), and one query's softmax attention is a sum over (key, value) pairs, unchanged by
    permuting them. So a decode step (one new token) attends over the raw buffer without a mask.
    Semantics, as Mistral's: the token at position p sees positions p - window + 1 ... p.

    Several tokens at once (the prompt) need a causal mask with positions = slots, so they are
    accepted only while nothing has been evicted yet (length + T <= window); a longer prompt
    must be fed in pieces that keep to that, or one token at a time.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        window: int,
        batch: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.k, self.v = _kv_buffers("SlidingWindowKVCache", num_layers, batch, num_kv_heads,
                                     ("window", window), head_dim, dtype, device)
        self.window = window
        self._length = 0

    @classmethod
    def for_model(cls, model: Any, window: int, batch: int = 1) -> SlidingWindowKVCache:
        return cls(**cache_layout(model), window=window, batch=batch)

    @property
    def length(self) -> int:
        """Absolute position of the next token (RoPE needs it), not the number of slots used."""
        return self._length

    @property
    def held(self) -> int:
        """Positions actually kept: min(length, window)."""
        return min(self._length, self.window)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t = k.shape[2]
        start = self._length
        if t == 1:
            slot = start % self.window
            self.k[layer][:, :, slot : slot + 1] = k
            self.v[layer][:, :, slot : slot + 1] = v
            end = min(start + 1, self.window)
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if start + t > self.window:
            raise ValueError(
                f"SlidingWindowKVCache: {t} tokens at once after {start} positions exceed the "
                f"window of {self.window}; feed at most {self.window - start} tokens at once "
                "here, then one token at a time"
            )
        self.k[layer][:, :, start : start + t] = k
        self.v[layer][:, :, start : start + t] = v
        return self.k[layer][:, :, : start + t], self.v[layer][:, :, : start + t]

    def advance(self, num_tokens: int) -> None:
        self._length += num_tokens

    def reset(self) -> None:
        self._length = 0

    def nbytes(self) -> int:
        """Bytes allocated by the ring buffers (``window`` positions, whatever the length)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
