"""The rows sorted by expert (`plan`), on the GPU and without a host sync: one program's counting sort
(`count_sort`, also called inside router_triton's kernels) up to PLAN_KERNEL_ROWS rows; beyond, the
same counting sort over chunks of rows in three launches (each chunk's counts, every chunk's first
position per expert, each row's place), where torch.sort and its bookkeeping took about nine.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.step_kernel import step_kernel


@step_kernel("M")
def _plan_kernel(experts_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, M, E,
                 M_POW2: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """The decode-sized plan in one program (see count_sort)."""
    pdl.wait_for_previous_kernel(PDL)
    count_sort(experts_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, M, E, M_POW2, E_POW2, CHUNK)


@triton.jit
def count_sort(experts_ptr, order_ptr, position_ptr, counts_ptr, offsets_ptr, M, E,
               M_POW2: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr):
    """Counting sort of up to a few hundred rows by expert, in the calling program.

    Row i goes to offsets[e_i] + (number of earlier rows with the same expert): stable."""
    i = tl.arange(0, M_POW2)
    e = tl.load(experts_ptr + i, mask=i < M, other=E_POW2)  # padding matches no expert
    ex = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    rank = tl.zeros((M_POW2,), dtype=tl.int32)
    for j0 in tl.static_range(0, M_POW2, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        ej = tl.load(experts_ptr + j, mask=j < M, other=E_POW2)
        counts += tl.sum((ej[None, :] == ex[:, None]).to(tl.int32), 1)
        rank += tl.sum(((ej[None, :] == e[:, None]) & (j[None, :] < i[:, None])).to(tl.int32), 1)
    offsets = tl.cumsum(counts, 0) - counts
    position = tl.sum(tl.where(e[:, None] == ex[None, :], offsets[None, :], 0), 1) + rank
    tl.store(position_ptr + i, position, mask=i < M)
    tl.store(order_ptr + position, i, mask=i < M)
    tl.store(counts_ptr + ex, counts, mask=ex < E)
    tl.store(offsets_ptr + ex, offsets, mask=ex < E)


@dataclasses.dataclass
class Plan:
    """Rows sorted by expert, computed on the GPU without a host sync."""
    order: torch.Tensor  # [m] int32: sorted position i holds input row order[i]
    position: torch.Tensor  # [m] int32: the inverse, input row r sits at sorted position position[r]
    counts: torch.Tensor  # [E] int32 rows per expert
    offsets: torch.Tensor  # [E] int32 first sorted row of each expert
    num_rows: int
    num_experts: int

    def max_tiles(self, block_t: int) -> int:
        """Upper bound on the tiles, sum over experts of ceil(count / block_t), from the row count alone:
        each non-empty expert (at most min(E, rows) of them) adds at most block_t - 1 rows of padding."""
        return (self.num_rows + (block_t - 1) * min(self.num_experts, self.num_rows)) // block_t


PLAN_KERNEL_ROWS = 512  # up to here one program sorts (small decodes); beyond, one program a chunk
MAX_PLAN_CHUNKS = 128  # chunks of the multi-program sort: its middle launch holds [chunks, experts]


def empty_plan(rows: int, num_experts: int, device) -> Plan:
    """A Plan's buffers for `rows` rows, to be filled by a kernel that calls count_sort."""
    order = torch.empty(rows, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    return Plan(order, torch.empty_like(order), counts, torch.empty_like(counts), rows, num_experts)


def count_sort_sizes(rows: int) -> dict:
    """count_sort's block sizes for `rows` rows: all rows at once, compared CHUNK at a time (never
    more columns than rows: a decode step's 4-64 rows compare as [M_POW2, M_POW2] tiles, not [16, 512])."""
    m_pow2 = max(16, triton.next_power_of_2(rows))
    return {"M_POW2": m_pow2, "CHUNK": min(m_pow2, max(16, 8192 // m_pow2))}


def plan(experts: torch.Tensor, num_experts: int) -> Plan:
    """Sort rows by expert (stable) and count them; `experts` [m] holds each row's expert index."""
    flat = experts.reshape(-1).to(torch.int32)
    m, dev = flat.numel(), flat.device
    if 0 < m <= PLAN_KERNEL_ROWS:  # one launch instead of a dozen small torch ops
        p = empty_plan(m, num_experts, dev)
        _plan_kernel[(1,)](flat, p.order, p.position, p.counts, p.offsets, m, num_experts,
                           E_POW2=triton.next_power_of_2(num_experts), **count_sort_sizes(m), num_warps=8,
                           **pdl.launch_args(dev))
        return p
    p = empty_plan(m, num_experts, dev)
    if m == 0:
        p.counts.zero_()
        p.offsets.zero_()
        return p
    # Chunks of at least 256 rows, at most MAX_PLAN_CHUNKS of them: a 1,024-token decode's 4,096 rows
    # are 16 chunks of 256, an 8,192-token prefill's 32,768 rows 128 of 256.
    chunk = max(256, triton.next_power_of_2(triton.cdiv(m, MAX_PLAN_CHUNKS)))
    chunks, e_pow2 = triton.cdiv(m, chunk), triton.next_power_of_2(num_experts)
    firsts = torch.empty((chunks, e_pow2), dtype=torch.int32, device=dev)
    launch = pdl.launch_args(dev)
    _chunk_counts_kernel[(chunks,)](flat, firsts, m, E_POW2=e_pow2, CHUNK=chunk,
                                    SUB=min(chunk, max(16, 8192 // e_pow2)), num_warps=4, **launch)
    _chunk_firsts_kernel[(1,)](firsts, p.counts, p.offsets, num_experts, chunks, E_POW2=e_pow2,
                               CHUNKS_POW2=triton.next_power_of_2(chunks), num_warps=8, **launch)
    _chunk_place_kernel[(chunks,)](flat, firsts, p.order, p.position, m, E_POW2=e_pow2, CHUNK=chunk,
                                   SUB=min(chunk, 8192 // chunk), num_warps=8, **launch)
    return p


# The multi-program counting sort: row i of chunk c goes to
#   offsets[e_i] + (rows of expert e_i in chunks before c) + (rows of expert e_i before i in chunk c),
# the first two summed per (chunk, expert) by the middle launch, the last counted pairwise in the chunk.

@step_kernel("M")
def _chunk_counts_kernel(experts_ptr, counts_ptr, M, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
                         SUB: tl.constexpr, PDL: tl.constexpr):
    """counts[c, e]: the rows of expert e in chunk c (row c of a [chunks, E_POW2] buffer), compared
    SUB rows at a time."""
    c = tl.program_id(0)
    ex = tl.arange(0, E_POW2)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    pdl.wait_for_previous_kernel(PDL)
    for j0 in tl.static_range(0, CHUNK, SUB):
        j = c * CHUNK + j0 + tl.arange(0, SUB)
        e = tl.load(experts_ptr + j, mask=j < M, other=E_POW2)  # padding matches no expert
        counts += tl.sum((e[None, :] == ex[:, None]).to(tl.int32), 1)
    tl.store(counts_ptr + c * E_POW2 + ex, counts)


@step_kernel("chunks")
def _chunk_firsts_kernel(firsts_ptr, counts_ptr, offsets_ptr, E, chunks, E_POW2: tl.constexpr,
                         CHUNKS_POW2: tl.constexpr, PDL: tl.constexpr):
    """In place, each chunk's counts [chunks, E_POW2] become the sorted position of its first row of
    each expert; and the plan's counts and offsets per expert."""
    c = tl.arange(0, CHUNKS_POW2)
    ex = tl.arange(0, E_POW2)
    at = firsts_ptr + c[:, None] * E_POW2 + ex[None, :]
    pdl.wait_for_previous_kernel(PDL)
    per_chunk = tl.load(at, mask=(c < chunks)[:, None], other=0)
    counts = tl.sum(per_chunk, 0)
    offsets = tl.cumsum(counts, 0) - counts
    tl.store(at, offsets[None, :] + tl.cumsum(per_chunk, 0) - per_chunk, mask=(c < chunks)[:, None])
    tl.store(counts_ptr + ex, counts, mask=ex < E)
    tl.store(offsets_ptr + ex, offsets, mask=ex < E)


@step_kernel("M")
def _chunk_place_kernel(experts_ptr, firsts_ptr, order_ptr, position_ptr, M, E_POW2: tl.constexpr,
                        CHUNK: tl.constexpr, SUB: tl.constexpr, PDL: tl.constexpr):
    """Each row of chunk c at its chunk's first position for its expert plus its rank among the
    chunk's earlier rows of that expert (stable), compared SUB rows at a time."""
    c = tl.program_id(0)
    i = c * CHUNK + tl.arange(0, CHUNK)
    pdl.wait_for_previous_kernel(PDL)
    e = tl.load(experts_ptr + i, mask=i < M, other=E_POW2)
    rank = tl.zeros((CHUNK,), dtype=tl.int32)
    for j0 in tl.static_range(0, CHUNK, SUB):
        j = c * CHUNK + j0 + tl.arange(0, SUB)
        ej = tl.load(experts_ptr + j, mask=j < M, other=E_POW2)
        rank += tl.sum(((ej[None, :] == e[:, None]) & (j[None, :] < i[:, None])).to(tl.int32), 1)
    position = tl.load(firsts_ptr + c * E_POW2 + e, mask=i < M, other=0) + rank
    tl.store(position_ptr + i, position, mask=i < M)
    tl.store(order_ptr + position, i, mask=i < M)
