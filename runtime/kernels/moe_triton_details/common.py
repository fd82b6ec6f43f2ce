"""What every MoE kernel shares: which tile a program owns, where its x rows are, the SwiGLU epilogue.

The grid of each grouped kernel has a fixed upper bound (`Plan.max_tiles`), so nothing is planned on
the host: each program finds its tile from the per-expert counts itself (`find_tile`; the GEMM's
short last tiles, `find_tail_tile`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels.moe import SWIGLU_ALPHA


@triton.jit
def find_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr,
              TAIL_T: tl.constexpr = 0):
    """(expert, first row, end row) of this program's tile, or expert == E where there is none.

    Expert e's rows [offset_e, offset_e + count_e) form cdiv(count_e, BLOCK_T) tiles, numbered
    expert after expert. With TAIL_T, an expert's last count_e % BLOCK_T rows, when there are at most
    TAIL_T of them, are left out (`find_tail_tile` gives them to a tile of TAIL_T rows)."""
    ex = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    if TAIL_T > 0:
        rem = counts % BLOCK_T
        counts -= tl.where(rem <= TAIL_T, rem, 0)
    tiles = (counts + BLOCK_T - 1) // BLOCK_T
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= tile).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(ex < expert, tiles, 0), 0)
    count = tl.sum(tl.where(ex == expert, counts, 0), 0)
    offset = tl.load(offsets_ptr + tl.minimum(expert, E - 1))
    row0 = offset + (tile - first_tile) * BLOCK_T
    return expert, row0, offset + count


@triton.jit
def find_tail_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T: tl.constexpr, TAIL_T: tl.constexpr,
                   E_POW2: tl.constexpr):
    """(expert, first row, end row) of the tile-th expert whose last count_e % BLOCK_T rows number 1 to
    TAIL_T (what `find_tile(..., TAIL_T)` leaves out), or expert == E where there is none."""
    ex = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    rem = counts % BLOCK_T
    has_tail = ((rem > 0) & (rem <= TAIL_T)).to(tl.int32)
    expert = tl.sum((tl.cumsum(has_tail, 0) <= tile).to(tl.int32), 0)
    end = tl.load(offsets_ptr + tl.minimum(expert, E - 1)) + tl.sum(tl.where(ex == expert, counts, 0), 0)
    return expert, end - tl.sum(tl.where(ex == expert, rem, 0), 0), end


@triton.jit
def row_source(source_ptr, row, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr):
    """x's row for sorted row `row`: source[row] // SOURCE_DIV (gathered from the tokens) or itself."""
    if GATHER:
        return (tl.load(source_ptr + row) // SOURCE_DIV).to(tl.int64)
    return row.to(tl.int64)


@triton.jit
def clamped_swiglu(gate, linear, limit):
    """gpt-oss's activation (moe.swiglu), in fp32: the gate clamped from above, the linear half both
    ways, plus one. Every kernel's mlp1 epilogue calls this one; only the (gate, linear) split differs
    with each kernel's accumulator layout."""
    gate = tl.minimum(gate, limit)
    linear = tl.minimum(tl.maximum(linear, -limit), limit)
    return gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)


assert SWIGLU_ALPHA == 1.702  # clamped_swiglu hard-codes the same constant
