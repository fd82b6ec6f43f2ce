"""The GEMV's two tensor-core (mma.sync m16n8k16, bf16 in, fp32 accumulate) routes, for bf16 x.

The CUDA-core GEMV (gemv.py) spends ~5 instructions per weight (decode to fp16, widen to fp32, FMA, x
conversions) and is issue-bound at ~45% of the copy bandwidth. These routes hand the multiply-adds to
mma.sync and decode with the bf16 bit trick of `ptx.decode_ptx`, about 4 instructions per weight
(`ptx.tensor_core_step_ptx`).

One row a tile (`tensor_core_row_tile`): a GEMV has one column; the MMA is used on its diagonal.
Lane l = 4g + t of a warp supplies A rows g and g + 8 at k slots {2t, 2t+1, 2t+8, 2t+9} and B column
g at the same k slots, and receives D[g, 2t..2t+1] and D[g+8, 2t..2t+1]. So D[g, g] (and D[g+8, g])
sums, over the four lanes 4g..4g+3 alone, each lane's A row g values times its own B values: if
every lane puts into A two weight rows (an even row and the odd row after it, as two tensors of the
same shape, so elementwise they always pair up) and into B the x values at the same k, D[g, g] is
the dot product of the even row that lanes 4g..4g+3 share with x over the K positions they hold,
whatever the other lanes do. Lanes 4g..4g+3 do share their rows: the weight tiles [BLOCK_N / 2,
GPI * 4] int32 hold a chunk's words of a row contiguously, so the compiler gives each thread one
block's 4 words (a 16-byte load) and puts consecutive lanes on consecutive blocks of a row (checked
for Triton 3.6 and 3.9; `tensor_core_gemv_verified` in moe_triton.py also checks it once per GPU on
a probe, and falls back to the CUDA-core route if a compiler lays them out otherwise). The scale
bytes and x are loaded inside the asm, from addresses, so that the weights are the only tensors
whose layout the compiler chooses. D[g, g] sits in lane 4g + g // 2 (element g % 2, and g % 2 + 2
for the odd row); `_ROW_RESULT` keeps those and zeroes the rest, and a sum over the tile's blocks
adds the partial dot products up.

8 or 16 rows a tile (`tensor_core_rows_tile`): the same MMA as a real product, 8 tokens a group as
its columns, each block decoded once for all of them; the lanes must then also follow the rows'
order (which the probe checks too).

The block scales are applied with an offset of 2^-TENSOR_CORE_SCALE_OFFSET (see ptx.py), undone here
by `_UNDO`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels.moe_triton_details.common import clamped_swiglu, row_source
from runtime.kernels.moe_triton_details.ptx import (
    TENSOR_CORE_SCALE_OFFSET,
    tensor_core_row_result_ptx,
    tensor_core_rows_result_ptx,
    tensor_core_step_constraints,
    tensor_core_step_ptx,
)

_STEP = tl.constexpr(tensor_core_step_ptx())
_STEP_CONSTRAINTS = tl.constexpr(tensor_core_step_constraints(1))
_ROW_RESULT = tl.constexpr(tensor_core_row_result_ptx())
_RESULT_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["f"] * 8))
_UNDO = tl.constexpr(2.0 ** TENSOR_CORE_SCALE_OFFSET)
_STEP2 = tl.constexpr(tensor_core_step_ptx(2))
_STEP2_CONSTRAINTS = tl.constexpr(tensor_core_step_constraints(2))
_ROWS_RESULT = tl.constexpr(tensor_core_rows_result_ptx())


@triton.jit
def tensor_core_row_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row, N,
                   stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                         K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr,
                         SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x (bf16) against BLOCK_N output features of one expert, on tensor cores (see above):
    the tile's even and odd features as two [BLOCK_N / 2, GPI * 4] tiles of weight words. K is walked
    in unrolled chunks of GPI blocks per weight row; in a last, partial chunk the weights past K load
    as zeros and their scale and x addresses stay inside the row. Features past N re-read feature
    N - 1 and are never stored. With SWIGLU the even features are the gates and the odd ones their
    linear halves (the checkpoint interleaves them)."""
    K_WORDS: tl.constexpr = K_BYTES // 4
    GROUPS: tl.constexpr = K_BYTES // 16
    GPI: tl.constexpr = BLOCK_K // 32
    HALF: tl.constexpr = BLOCK_N // 2
    even = tl.program_id(1) * BLOCK_N + 2 * tl.arange(0, HALF)
    rows_a = tl.minimum(even, N - 1).to(tl.int64)[:, None]
    rows_b = tl.minimum(even + 1, N - 1).to(tl.int64)[:, None]
    # [HALF, GPI * 4] tiles: a chunk's words of a row are contiguous, so the compiler vectorizes each
    # thread's 4 words (one block) and puts consecutive lanes on consecutive blocks of the same row.
    q = tl.arange(0, GPI * 4)[None, :]
    wa_ptrs = words_ptr + expert * stride_we + rows_a * K_WORDS + q
    wb_ptrs = words_ptr + expert * stride_we + rows_b * K_WORDS + q
    x_row = x_ptr + row_source(source_ptr, row, GATHER, SOURCE_DIV) * stride_x
    chain1 = tl.zeros((HALF, GPI * 4), dtype=tl.float32)  # the MMAs' two accumulator chains (both rows each)
    chain2 = tl.zeros((HALF, GPI * 4), dtype=tl.float32)
    for c in tl.static_range((GROUPS + GPI - 1) // GPI):
        group = c * GPI + q // 4
        if (c + 1) * GPI <= GROUPS:
            wa = tl.load(wa_ptrs + c * GPI * 4)
            wb = tl.load(wb_ptrs + c * GPI * 4)
        else:  # past K: zero weights, and scale and x addresses kept inside the row (finite values)
            wa = tl.load(wa_ptrs + c * GPI * 4, mask=group < GROUPS, other=0)
            wb = tl.load(wb_ptrs + c * GPI * 4, mask=group < GROUPS, other=0)
            group = tl.minimum(group, GROUPS - 1)
        sa = (scales_ptr + expert * stride_se + rows_a * GROUPS + group).to(tl.int64)
        sb = (scales_ptr + expert * stride_se + rows_b * GROUPS + group).to(tl.int64)
        xs = (x_row + group * 32 + 0 * rows_a).to(tl.int64)
        chain1, chain2 = tl.inline_asm_elementwise(
            _STEP, _STEP_CONSTRAINTS, [wa, wb, sa, sb, xs, chain1, chain2],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    part_a, part_b = tl.inline_asm_elementwise(_ROW_RESULT, _RESULT_CONSTRAINTS, [chain1, chain2],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    ya = tl.sum(part_a, 1) * _UNDO
    yb = tl.sum(part_b, 1) * _UNDO
    if bias_ptr is not None:
        ya += tl.load(bias_ptr + expert * stride_biase + even, mask=even < N, other=0.0).to(tl.float32)
        yb += tl.load(bias_ptr + expert * stride_biase + even + 1, mask=even + 1 < N,
                      other=0.0).to(tl.float32)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    if SWIGLU:  # even features are gates, odd ones linear: output feature i is the pair (2i, 2i + 1)
        act = clamped_swiglu(ya, yb, limit)
        tl.store(out_row + even // 2, act.to(out_ptr.dtype.element_ty), mask=even + 1 < N)
    else:
        tl.store(out_row + even, ya.to(out_ptr.dtype.element_ty), mask=even < N)
        tl.store(out_row + even + 1, yb.to(out_ptr.dtype.element_ty), mask=even + 1 < N)


@triton.jit
def _x_rows(x_ptr, source_ptr, row0, n, token, stride_x, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr):
    """Addresses of the x rows of a tile's tokens `token` (a tensor); tokens past the tile's n rows
    read its last row (their results are never stored)."""
    return x_ptr + row_source(source_ptr, row0 + tl.minimum(token, n - 1), GATHER, SOURCE_DIV) * stride_x


@triton.jit
def _rows_store(e, o, bias_ptr, out_ptr, expert, row0, n, N, even, first_token, stride_out, stride_biase,
                         limit, SWIGLU: tl.constexpr):
    """Store one group of 8 tokens from `_ROWS_RESULT`'s tensors: element [r, 4t + j] (j < 2) is
    token first_token + 2t + j of the even feature `even[r]` (e) and the odd one after it (o)."""
    c = tl.arange(0, 16)[None, :]
    token = first_token + 2 * (c // 4) + c % 2
    keep = (c % 4 < 2) & (token < n)
    if bias_ptr is not None:
        e += tl.load(bias_ptr + expert * stride_biase + even, mask=even < N, other=0.0).to(tl.float32)
        o += tl.load(bias_ptr + expert * stride_biase + even + 1, mask=even + 1 < N, other=0.0).to(tl.float32)
    out_rows = out_ptr + (row0 + token).to(tl.int64) * stride_out
    if SWIGLU:  # even features are gates, odd ones linear: output feature i is the pair (2i, 2i + 1)
        act = clamped_swiglu(e, o, limit)
        tl.store(out_rows + even // 2, act.to(out_ptr.dtype.element_ty), mask=keep & (even + 1 < N))
    else:
        tl.store(out_rows + even, e.to(out_ptr.dtype.element_ty), mask=keep & (even < N))
        tl.store(out_rows + even + 1, o.to(out_ptr.dtype.element_ty), mask=keep & (even + 1 < N))


@triton.jit
def _rows_block_words(w_ptrs, block, GROUPS: tl.constexpr, FULL: tl.constexpr):
    """The words of each lane's block `block` of a weight row (w_ptrs + the block's first word); past K
    (in a last, partial chunk) zeros."""
    if FULL:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=block < GROUPS, other=0)


@triton.jit
def tensor_core_rows_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, n, N,
                        stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                          K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr,
                          SWIGLU: tl.constexpr, TOKEN_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """Up to 8 * TOKEN_GROUPS rows of x (bf16) of one expert against BLOCK_N output features, on tensor
    cores as a real matrix product (see above): lanes 4g..4g + 3 hold the even and odd weight rows of
    tile row r (g = r % 8) and supply token g of each group of 8 as the B column, and in each chunk
    of K lane 4g + t holds blocks SUB * t .. SUB * t + SUB - 1 (SUB = BLOCK_K / 128: contiguous
    bytes, so a lane quad reads 64 * SUB bytes of a row at once), so every lane with the same t holds
    the same K positions. Each block is decoded once for all the tile's tokens. K is walked in
    unrolled chunks; in a last, partial chunk the weights past K load as zeros and their scale and x
    addresses stay inside the row. Features past N re-read feature N - 1 and are never stored."""
    K_WORDS: tl.constexpr = K_BYTES // 4
    GROUPS: tl.constexpr = K_BYTES // 16
    SUB: tl.constexpr = BLOCK_K // 128
    CB: tl.constexpr = BLOCK_K // 32  # blocks a chunk
    HALF: tl.constexpr = BLOCK_N // 2
    r = tl.arange(0, HALF)
    even = tl.program_id(1) * BLOCK_N + 2 * r
    rows_a = tl.minimum(even, N - 1).to(tl.int64)[:, None]
    rows_b = tl.minimum(even + 1, N - 1).to(tl.int64)[:, None]
    q = tl.arange(0, 16)[None, :]  # [HALF, 16] tiles: lane t of a quad holds words 4t..4t + 3 of each
    lane_block = (q // 4) * SUB  # the lane's first block in a chunk
    wa_ptrs = words_ptr + expert * stride_we + rows_a * K_WORDS + lane_block * 4 + q % 4
    wb_ptrs = words_ptr + expert * stride_we + rows_b * K_WORDS + lane_block * 4 + q % 4
    quad = (r % 8)[:, None]  # the lane quad holding row r: its token in each group of 8
    x0_rows = _x_rows(x_ptr, source_ptr, row0, n, quad, stride_x, GATHER, SOURCE_DIV)
    x1_rows = x0_rows
    if TOKEN_GROUPS == 2:
        x1_rows = _x_rows(x_ptr, source_ptr, row0, n, quad + 8, stride_x, GATHER, SOURCE_DIV)
    chain1 = tl.zeros((HALF, 16), dtype=tl.float32)  # group 0's two accumulator chains
    chain2 = tl.zeros((HALF, 16), dtype=tl.float32)
    chain3 = tl.zeros((HALF, 16), dtype=tl.float32)  # group 1's (TOKEN_GROUPS == 2)
    chain4 = tl.zeros((HALF, 16), dtype=tl.float32)
    for c in tl.static_range((GROUPS + CB - 1) // CB):
        for sub in tl.static_range(SUB):
            block = c * CB + lane_block + sub
            wa = _rows_block_words(wa_ptrs + (c * CB + sub) * 4, block, GROUPS, (c + 1) * CB <= GROUPS)
            wb = _rows_block_words(wb_ptrs + (c * CB + sub) * 4, block, GROUPS, (c + 1) * CB <= GROUPS)
            group = tl.minimum(block, GROUPS - 1)
            sa = (scales_ptr + expert * stride_se + rows_a * GROUPS + group).to(tl.int64)
            sb = (scales_ptr + expert * stride_se + rows_b * GROUPS + group).to(tl.int64)
            xs0 = (x0_rows + group * 32).to(tl.int64)
            if TOKEN_GROUPS == 1:
                chain1, chain2 = tl.inline_asm_elementwise(
                    _STEP, _STEP_CONSTRAINTS, [wa, wb, sa, sb, xs0, chain1, chain2],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                xs1 = (x1_rows + group * 32).to(tl.int64)
                chain1, chain2, chain3, chain4 = tl.inline_asm_elementwise(
                    _STEP2, _STEP2_CONSTRAINTS, [wa, wb, sa, sb, xs0, xs1, chain1, chain2, chain3, chain4],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=4)
    features = even[:, None]
    e, o = tl.inline_asm_elementwise(_ROWS_RESULT, _RESULT_CONSTRAINTS, [chain1, chain2],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    _rows_store(e * _UNDO, o * _UNDO, bias_ptr, out_ptr, expert, row0, n, N, features, 0, stride_out,
                         stride_biase, limit, SWIGLU)
    if TOKEN_GROUPS == 2:
        e, o = tl.inline_asm_elementwise(_ROWS_RESULT, _RESULT_CONSTRAINTS, [chain3, chain4],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        _rows_store(e * _UNDO, o * _UNDO, bias_ptr, out_ptr, expert, row0, n, N, features, 8,
                             stride_out, stride_biase, limit, SWIGLU)
