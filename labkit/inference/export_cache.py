"""Caches an exporter can trace: fixed shapes, positions and masks given as tensors.

An exported graph (Core ML, ONNX, OpenVINO) has no Python ``int`` offset and no growing list
of tensors, so the model's one forward runs with a cache whose positions and mask are graph
inputs. Two layouts cover every exporter here:

* ``StaticCache`` — K/V of fixed length ``S`` per layer, written at the new tokens' positions
  (``index_put``, which coremltools lowers to a slice update) and read whole under an explicit
  mask: Core ML's cache as inputs/outputs (a copy per step) and its stateful cache (the buffers
  are the model's registered states, written in place).
* ``PastKVCache`` — the past K/V come in as tensors, the new ones are concatenated, and the
  results ("present") go out: ONNX's and OpenVINO's ``past_key_values`` convention.

Tested against the eager forward (tests/test_export_cache.py): the same logits, token by token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _GivenPositions:
    """Positions and mask are graph inputs, handed over as they came; nothing advances."""

    _positions: torch.Tensor
    _mask: torch.Tensor

    def positions(self, num_tokens: int) -> torch.Tensor:
        return self._positions

    def mask(self, num_tokens: int) -> torch.Tensor:
        return self._mask

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: the caller feeds the next positions (a graph has no state to move)."""


class StaticCache(_GivenPositions):
    """Per layer a fixed ``[B, H_kv, S, d]`` K and V, written at ``position`` (a tensor ``[T]``).

    ``in_place=True`` writes into the given tensors (registered buffers that become Core ML
    states, or the KV cache a compiled static step decodes into); ``False`` writes into copies,
    collected in ``new_k`` / ``new_v`` for the graph to return. ``mask`` is what SDPA adds or applies over all ``S`` slots (``[B|1, 1, T, S]``).
    """

    def __init__(
        self,
        k: Sequence[torch.Tensor],
        v: Sequence[torch.Tensor],
        position: torch.Tensor,
        mask: torch.Tensor,
        *,
        in_place: bool = True,
    ) -> None:
        self.k, self.v = list(k), list(v)
        self._positions = position
        self._mask = mask
        self.in_place = in_place
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_all, v_all = self.k[layer], self.v[layer]
        if not self.in_place:
            k_all, v_all = k_all.clone(), v_all.clone()
        k_all[:, :, self._positions] = k
        v_all[:, :, self._positions] = v
        if not self.in_place:
            self.new_k.append(k_all)
            self.new_v.append(v_all)
        return k_all, v_all


class PastKVCache(_GivenPositions):
    """Past K/V as inputs (``[B, H_kv, P, d]`` per layer), new K/V concatenated after them.

    ``positions`` (``[T]``, or ``[B, 1, T]`` for a left-padded batch) and ``mask``
    (``[..., T, P + T]``) come from the graph's inputs; ``present_k`` / ``present_v`` hold the
    concatenated K/V per layer for the graph to return.
    """

    def __init__(
        self,
        past_k: Sequence[torch.Tensor],
        past_v: Sequence[torch.Tensor],
        positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        self.past_k, self.past_v = list(past_k), list(past_v)
        self._positions = positions
        self._mask = mask
        self.present_k: list[torch.Tensor] = []
        self.present_v: list[torch.Tensor] = []

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past_k[layer], k], dim=2)
        v = torch.cat([self.past_v[layer], v], dim=2)
        self.present_k.append(k)
        self.present_v.append(v)
        return k, v
