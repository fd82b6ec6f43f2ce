"""Per-sequence KV cache: post-RoPE keys and values for every layer, grown as the sequence grows.

Storage doubles when full, so appending is amortised O(1) and memory stays within 2x of what the
sequence holds. (The coordinator issue replaces this with a shared paged pool.)
"""

from __future__ import annotations

import torch


class SequenceKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 16):
        self.length = 0  # positions written in every layer
        self._shape = (num_kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.keys = [self._empty(capacity) for _ in range(num_layers)]
        self.values = [self._empty(capacity) for _ in range(num_layers)]

    def _empty(self, capacity: int) -> torch.Tensor:
        return torch.empty((capacity, *self._shape), dtype=self._dtype, device=self._device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, KVH, D] at positions start..start+n-1 of `layer`."""
        end = start + k.shape[0]
        if end > self.keys[layer].shape[0]:
            capacity = max(end, 2 * self.keys[layer].shape[0])
            for store in (self.keys, self.values):
                grown = self._empty(capacity)
                grown[:start] = store[layer][:start]
                store[layer] = grown
        self.keys[layer][start:end] = k
        self.values[layer][start:end] = v

    def read(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][start:end], self.values[layer][start:end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
