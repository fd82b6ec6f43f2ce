"""The step description: what one forward step computes, on the host and as the kernels see it.

`Step` is what the scheduler hands the model: a flat batch of tokens from any number of sequences
(prompt chunks and single decode tokens mixed), each chunk with its sequence's KV page tables, and
the rows whose next-token logits are wanted. `PagedStep` is the same step on the device, built once
for all layers: each kind of layer's new-key slots and block tables, and the query offsets. Every
attention (kernel or reference) reads it, and CUDA graphs stage it into fixed buffers.
"""

from __future__ import annotations

import dataclasses

import torch

from runtime.kv_cache import RELEASED, PagePool, PageTables
from runtime.transfer import to_device


@dataclasses.dataclass
class SequenceChunk:
    """The tokens of one sequence in this step: positions start .. start + length - 1."""
    start: int
    length: int
    cache: PageTables


@dataclasses.dataclass
class Step:
    token_ids: torch.Tensor  # [N] int64, the sequences' chunks concatenated in order
    positions: torch.Tensor  # [N] int64, absolute position of each token
    chunks: list[SequenceChunk]
    logits_indices: torch.Tensor  # [M] int64, flat indices whose next-token logits are wanted


@dataclasses.dataclass
class PagedLayers:
    """One kind of layer's view of a step's KV: where the new keys go, and the block tables."""
    pool: PagePool
    slots: torch.Tensor  # [N] int64 pool row of each new token's key and value
    block_table: torch.Tensor  # [S, max pages] int32 (-1 for a sliding layer's released pages)

    @classmethod
    def of(cls, chunks: list[SequenceChunk], sliding: bool, device) -> "PagedLayers":
        slots = torch.cat([c.cache.slots(sliding, c.start, c.start + c.length) for c in chunks])
        tables = [c.cache.table(sliding) for c in chunks]
        width = max(len(t) for t in tables)
        padded = [t + [RELEASED] * (width - len(t)) for t in tables]  # entries the kernel never reads
        pool = chunks[0].cache.sliding_pool if sliding else chunks[0].cache.pool
        return cls(pool, slots, to_device(padded, torch.int32, device))


@dataclasses.dataclass
class PagedStep:
    """What the Triton attention needs about a step, built once for all layers."""
    full: PagedLayers
    sliding: PagedLayers | None
    cu_q: torch.Tensor  # [S + 1] int32
    q_start: torch.Tensor  # [S] int32
    max_q_len: int
    max_k_len: int
    decodes: int = 0  # leading sequences with one query each (decodes), for the attention's tiles
    # The same shapes every step, nothing sized on the host (a CUDA graph's step): expert parallelism
    # then exchanges fixed-capacity buffers (parallel/experts.py).
    fixed_shapes: bool = False
    # [N] 1 for a real row, 0 for a CUDA graph's padding (None: every row is real), for the experts'
    # load counts (GptOss.count_expert_load).
    real_rows: torch.Tensor | None = None

    @classmethod
    def of(cls, chunks: list[SequenceChunk], device) -> "PagedStep":
        cu_q = [0]
        for c in chunks:
            cu_q.append(cu_q[-1] + c.length)
        as_int32 = lambda values: to_device(values, torch.int32, device)  # noqa: E731
        sliding = PagedLayers.of(chunks, True, device) if chunks[0].cache.sliding_pool is not None else None
        decodes = next((i for i, c in enumerate(chunks) if c.length != 1), len(chunks))
        return cls(PagedLayers.of(chunks, False, device), sliding, as_int32(cu_q),
                   as_int32([c.start for c in chunks]), max(c.length for c in chunks),
                   max(c.start + c.length for c in chunks), decodes)

    def layers(self, sliding: bool) -> PagedLayers:
        return self.sliding if sliding else self.full
