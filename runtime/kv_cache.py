"""Paged KV cache: one pool of fixed-size pages per model, each sequence a list of page ids.

Every layer has its own key and value page arrays [num_pages, page_size, KVH, D] (post-RoPE), and a
sequence's page list is the same for all layers, so one block table row serves the whole model.
A pool is either fixed (sized by the engine from free GPU memory, or by `kv_cache_tokens`): the
scheduler reserves a step's pages before the step and preempts sequences when they run out; or
growable (the default without a size): it doubles when it runs out (page ids stay valid, so block
tables do too). The sliding-window layers still keep every page (bounded storage for them is open).
"""

from __future__ import annotations

import torch

PAGE_SIZE = 16


class OutOfPages(RuntimeError):
    """A fixed pool has no free page left."""


class PagePool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, page_size: int = PAGE_SIZE, num_pages: int = 64,
                 growable: bool = True):
        self.page_size, self._shape, self.growable = page_size, (num_kv_heads, head_dim), growable
        self._dtype, self._device = dtype, device
        self.keys = [self._empty(num_pages) for _ in range(num_layers)]
        self.values = [self._empty(num_pages) for _ in range(num_layers)]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    def _empty(self, num_pages: int) -> torch.Tensor:
        return torch.empty((num_pages, self.page_size, *self._shape), dtype=self._dtype, device=self._device)

    @property
    def num_pages(self) -> int:
        return self.keys[0].shape[0]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def allocate(self) -> int:
        if not self._free:
            if not self.growable:
                raise OutOfPages(f"all {self.num_pages} KV pages are in use")
            self._grow()
        return self._free.pop()

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))

    def _grow(self) -> None:
        old = self.num_pages
        for store in (self.keys, self.values):
            for layer, pages in enumerate(store):
                grown = self._empty(2 * old)
                grown[:old] = pages
                store[layer] = grown
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class SequenceKV:
    """One sequence's pages in a pool; positions 0..length-1 hold keys and values in every layer."""

    def __init__(self, pool: PagePool):
        self.pool = pool
        self.pages: list[int] = []
        self._slots: tuple[int, int, torch.Tensor] | None = None

    def pages_missing(self, end: int) -> int:
        """Pages still to allocate before positions up to end - 1 can be written."""
        return max(0, self.pool.pages_for(end) - len(self.pages))

    def reserve(self, end: int) -> None:
        """Allocate the pages positions up to end - 1 need (OutOfPages from a fixed pool that has too few)."""
        if not self.pool.growable and self.pages_missing(end) > self.pool.free_pages:
            raise OutOfPages(f"{self.pages_missing(end)} more KV pages needed, {self.pool.free_pages} free")
        while len(self.pages) * self.pool.page_size < end:
            self.pages.append(self.pool.allocate())

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat pool rows (page * page_size + offset) of positions start..end-1, allocating pages as
        needed; remembered, since every layer asks for the same ones in a step."""
        if self._slots is not None and self._slots[:2] == (start, end):
            return self._slots[2]
        ps = self.pool.page_size
        self.reserve(end)
        table = torch.tensor(self.pages, dtype=torch.int64)
        positions = torch.arange(start, end)
        slots = (table[positions // ps] * ps + positions % ps).to(self.pool._device)
        self._slots = (start, end, slots)
        return slots

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, KVH, D] at positions start..start+n-1 of `layer`."""
        slots = self.slots(start, start + k.shape[0])
        self.pool.keys[layer].flatten(0, 1)[slots] = k
        self.pool.values[layer].flatten(0, 1)[slots] = v

    def read(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [end - start, KVH, D] of positions start..end-1 (a gathered copy)."""
        slots = self.slots(start, end)
        return self.pool.keys[layer].flatten(0, 1)[slots], self.pool.values[layer].flatten(0, 1)[slots]

    def release(self) -> None:
        """Give the pages back to the pool (the sequence is finished)."""
        self.pool.release(self.pages)
        self.pages, self._slots = [], None

    def __del__(self):
        self.release()

    def nbytes(self) -> int:
        per_page = sum(t[0].numel() * t.element_size() for t in self.pool.keys + self.pool.values)
        return len(self.pages) * per_page
