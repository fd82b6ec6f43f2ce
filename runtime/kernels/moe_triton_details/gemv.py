"""The decode-sized grouped GEMM: `_moe_gemv_kernel`, without shared memory, for 1 to 16 rows of an
expert a tile.

On CUDA cores (DECODE_FP16, DECODE_E4M3; DECODE_INT in the interpreter) a program owns up to 4 rows
of one expert (a body specialised to the tile's row count, by a uniform branch, so a tile of one row
does one row's multiplies) and BLOCK_N output features. Each thread streams 16-byte blocks of packed
weights (one 32-value MXFP4 block, one 128-bit load), decodes each word of 8 values with a few
byte-parallel logic ops into exact fp16 (`ptx.decode32_ptx`: the value times 2^-14, no scale), widens
them to fp32 and multiplies them into each row of x with fp32 FMAs; the block's scale multiplies its
partial sum once. Every weight is read and decoded once per tile, whatever its row count.

With bf16 x the same kernel can hand the multiply-adds to mma.sync instead (gemv_tensor_core.py):
one row a tile (DECODE_TENSOR_CORE_ROW) or 8 or 16 (DECODE_TENSOR_CORE_ROWS).
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.moe_triton_details.common import clamped_swiglu, find_tile, row_source
from runtime.kernels.moe_triton_details.gemv_tensor_core import tensor_core_row_tile, tensor_core_rows_tile
from runtime.kernels.moe_triton_details.ptx import decode32_ptx

_DECODE32_FP16 = tl.constexpr(decode32_ptx(e4m3=False))
_DECODE32_E4M3 = tl.constexpr(decode32_ptx(e4m3=True))
_DECODE32_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 32 + ["r"] * 4))
# the kernel's routes, by Tiles.decode (DECODE_INT: the interpreter's, whatever the tiles say)
DECODE_INT, DECODE_FP16, DECODE_E4M3, DECODE_TENSOR_CORE_ROW, DECODE_TENSOR_CORE_ROWS = 0, 1, 2, 3, 4
DECODE_ROUTES = {"fp16": DECODE_FP16, "e4m3": DECODE_E4M3, "tensor_core_row": DECODE_TENSOR_CORE_ROW,
                 "tensor_core_rows": DECODE_TENSOR_CORE_ROWS}


@triton.jit
def _e2m1_fp32(code):
    """Integer-only decode (the interpreter's route): E2M1 nibble -> its value times 2^-14 as fp32."""
    e = (code >> 1) & 3
    m = code & 1
    magnitude = tl.where(e > 0, ((e + 112) << 23) | (m << 22), m * (112 << 23))
    return (((code >> 3) << 31) | magnitude).to(tl.float32, bitcast=True)


@triton.jit
def _byte_column(k0, k1, k2, k3, B: tl.constexpr):
    """The word made of byte B of k0 .. k3 (k0's lowest): kernel-order words back to a block's words."""
    return (((k0 >> 8 * B) & 255) | (((k1 >> 8 * B) & 255) << 8) | (((k2 >> 8 * B) & 255) << 16)
            | (((k3 >> 8 * B) & 255) << 24))


@triton.jit
def _decode32(words, DECODE: tl.constexpr):
    """words [BLOCK_N, GPI, 4] int32 (one 32-value block per [row, group], 4 words each, in kernel
    order: mxfp4.quad_transpose) -> 8 fp32 tensors of the same shape: the n-th holds, at word position
    j, element 4n + j of the block, times 2^-14 (DECODE 0 or 1) or 2^-6 (DECODE 2). So x for the n-th
    is 4 contiguous elements per block."""
    if DECODE == 0:
        j = tl.arange(0, 4)[None, None, :]
        k0 = tl.sum(tl.where(j == 0, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        k1 = tl.sum(tl.where(j == 1, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        k2 = tl.sum(tl.where(j == 2, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        k3 = tl.sum(tl.where(j == 3, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        # kernel order back to the block's: its word w is byte w of each kernel-order word
        w0, w1, w2, w3 = (_byte_column(k0, k1, k2, k3, 0), _byte_column(k0, k1, k2, k3, 1),
                          _byte_column(k0, k1, k2, k3, 2), _byte_column(k0, k1, k2, k3, 3))
        lo = (4 * j).to(tl.uint32)  # element 4n + j is nibble 4 * (n % 2) + j of word n // 2
        hi = (4 * j + 16).to(tl.uint32)
        v0 = _e2m1_fp32((w0 >> lo) & 15)
        v1 = _e2m1_fp32((w0 >> hi) & 15)
        v2 = _e2m1_fp32((w1 >> lo) & 15)
        v3 = _e2m1_fp32((w1 >> hi) & 15)
        v4 = _e2m1_fp32((w2 >> lo) & 15)
        v5 = _e2m1_fp32((w2 >> hi) & 15)
        v6 = _e2m1_fp32((w3 >> lo) & 15)
        v7 = _e2m1_fp32((w3 >> hi) & 15)
    else:  # pack=4: the asm sees a block's 4 words; output n's 4 registers are elements 4n .. 4n + 3
        v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
            _DECODE32_E4M3 if DECODE == 2 else _DECODE32_FP16, _DECODE32_CONSTRAINTS, [words],
            dtype=(tl.float32,) * 8, is_pure=True, pack=4)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _gemv_chunk(acc, v0, v1, v2, v3, v4, v5, v6, v7, factor, x_row_ptr, x_offs, x_mask, MASK_K: tl.constexpr):
    """acc [BLOCK_N, GPI] += factor * (per block: sum of decoded weights * x) for one row of x.

    x_offs [GPI, 4]: offsets of elements 4n + j (n = 0) of each block; x_mask: the blocks inside K."""
    if MASK_K:
        x_ptrs = x_row_ptr + x_offs
        x0 = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x1 = tl.load(x_ptrs + 4, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x2 = tl.load(x_ptrs + 8, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x3 = tl.load(x_ptrs + 12, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x4 = tl.load(x_ptrs + 16, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x5 = tl.load(x_ptrs + 20, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x6 = tl.load(x_ptrs + 24, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
        x7 = tl.load(x_ptrs + 28, mask=x_mask, other=0.0).to(tl.float32)[None, :, :]
    else:
        x_ptrs = x_row_ptr + x_offs
        x0 = tl.load(x_ptrs).to(tl.float32)[None, :, :]
        x1 = tl.load(x_ptrs + 4).to(tl.float32)[None, :, :]
        x2 = tl.load(x_ptrs + 8).to(tl.float32)[None, :, :]
        x3 = tl.load(x_ptrs + 12).to(tl.float32)[None, :, :]
        x4 = tl.load(x_ptrs + 16).to(tl.float32)[None, :, :]
        x5 = tl.load(x_ptrs + 20).to(tl.float32)[None, :, :]
        x6 = tl.load(x_ptrs + 24).to(tl.float32)[None, :, :]
        x7 = tl.load(x_ptrs + 28).to(tl.float32)[None, :, :]
    part = v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3 + v4 * x4 + v5 * x5 + v6 * x6 + v7 * x7
    return acc + factor * tl.sum(part, 2)


@triton.jit
def _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr, x2_ptr, x3_ptr, x_offs, c, col_ok, kg,
               GROUPS: tl.constexpr, MASK_K: tl.constexpr, EVEN_N: tl.constexpr, DECODE: tl.constexpr,
               T: tl.constexpr, GPI: tl.constexpr):
    """One chunk (GPI blocks of each of the tile's BLOCK_N weight rows) for the T rows of x."""
    g_ok = (c * GPI + kg) < GROUPS
    if MASK_K:
        words = tl.load(w_ptrs + c * GPI * 4, mask=col_ok[:, None, None] & g_ok[None, :, None], other=0)
        scale = tl.load(s_ptrs + c * GPI, mask=col_ok[:, None] & g_ok[None, :], other=0)
    elif EVEN_N:
        words = tl.load(w_ptrs + c * GPI * 4)
        scale = tl.load(s_ptrs + c * GPI)
    else:
        words = tl.load(w_ptrs + c * GPI * 4, mask=col_ok[:, None, None], other=0)
        scale = tl.load(s_ptrs + c * GPI, mask=col_ok[:, None], other=0)
    factor = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127)
    v0, v1, v2, v3, v4, v5, v6, v7 = _decode32(words, DECODE)
    x_chunk = x_offs + c * GPI * 32
    x_mask = g_ok[:, None]
    acc0 = _gemv_chunk(acc0, v0, v1, v2, v3, v4, v5, v6, v7, factor, x0_ptr, x_chunk, x_mask, MASK_K)
    if T > 1:
        acc1 = _gemv_chunk(acc1, v0, v1, v2, v3, v4, v5, v6, v7, factor, x1_ptr, x_chunk, x_mask, MASK_K)
    if T > 2:
        acc2 = _gemv_chunk(acc2, v0, v1, v2, v3, v4, v5, v6, v7, factor, x2_ptr, x_chunk, x_mask, MASK_K)
    if T > 3:
        acc3 = _gemv_chunk(acc3, v0, v1, v2, v3, v4, v5, v6, v7, factor, x3_ptr, x_chunk, x_mask, MASK_K)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, N,
               stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
               K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
               DECODE: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_N: tl.constexpr, UNROLL: tl.constexpr):
    """T (1 to 4) rows of one expert against BLOCK_N of its output features, each weight decoded once.

    K (a constant) is walked in chunks of GPI 32-value blocks per weight row, each thread taking one
    block (16 bytes: one 128-bit load) of each of its rows; UNROLL unrolls the chunks, so the compiler
    can issue the next chunk's loads early, else they are a loop (fewer registers, quicker to compile).
    A last, partial chunk is masked. Each block's partial sums are scaled once by 2^(scale - 127),
    kept per [row, block] in fp32, and summed across the threads once, at the end. Within a chunk
    the blocks are taken in an interleaved order, which only keeps the compiler from packing a
    thread's scale bytes into one vector: it then gives the scales the layout of the per-block sums,
    with no shared-memory shuffle."""
    K_WORDS: tl.constexpr = K_BYTES // 4
    GROUPS: tl.constexpr = K_BYTES // 16
    GPI: tl.constexpr = BLOCK_K // 32  # 32-value blocks (one scale byte, 16 packed bytes) per chunk
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kg = tl.arange(0, GPI)
    kg = (kg % 2) * (GPI // 2) + kg // 2  # the interleaved order (any order is right; GPI >= 2)
    j = tl.arange(0, 4)
    w_ptrs = (words_ptr + expert * stride_we + cols[:, None, None].to(tl.int64) * K_WORDS
              + kg[None, :, None] * 4 + j[None, None, :])
    s_ptrs = scales_ptr + expert * stride_se + cols[:, None].to(tl.int64) * GROUPS + kg[None, :]
    x_offs = kg[:, None] * 32 + j[None, :]
    # the x rows (T <= 4; the pointers past T repeat the last row and are never used)
    R1: tl.constexpr = 1 if T > 1 else 0
    R2: tl.constexpr = 2 if T > 2 else R1
    R3: tl.constexpr = 3 if T > 3 else R2
    x0_ptr = x_ptr + row_source(source_ptr, row0, GATHER, SOURCE_DIV) * stride_x
    x1_ptr = x_ptr + row_source(source_ptr, row0 + R1, GATHER, SOURCE_DIV) * stride_x
    x2_ptr = x_ptr + row_source(source_ptr, row0 + R2, GATHER, SOURCE_DIV) * stride_x
    x3_ptr = x_ptr + row_source(source_ptr, row0 + R3, GATHER, SOURCE_DIV) * stride_x
    acc0 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    FULL: tl.constexpr = GROUPS // GPI  # chunks with every block inside K
    if UNROLL:
        for c in tl.static_range(FULL):
            acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr,
                                                x2_ptr, x3_ptr, x_offs, c, col_ok, kg, GROUPS, False,
                                                EVEN_N, DECODE, T, GPI)
    else:
        for c in range(FULL):
            acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr,
                                                x2_ptr, x3_ptr, x_offs, c, col_ok, kg, GROUPS, False,
                                                EVEN_N, DECODE, T, GPI)
    if GROUPS % GPI != 0:  # the last, partial chunk
        acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr, x2_ptr,
                                            x3_ptr, x_offs, FULL, col_ok, kg, GROUPS, True, EVEN_N, DECODE, T,
                                            GPI)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    UNDO: tl.constexpr = 64.0 if DECODE == 2 else 16384.0  # undoes the decode's 2^-6 (2^-14)
    _gemv_store(acc0, bias, UNDO, out_ptr, row0, stride_out, cols, N, limit, SWIGLU, BLOCK_N)
    if T > 1:
        _gemv_store(acc1, bias, UNDO, out_ptr, row0 + 1, stride_out, cols, N, limit, SWIGLU, BLOCK_N)
    if T > 2:
        _gemv_store(acc2, bias, UNDO, out_ptr, row0 + 2, stride_out, cols, N, limit, SWIGLU, BLOCK_N)
    if T > 3:
        _gemv_store(acc3, bias, UNDO, out_ptr, row0 + 3, stride_out, cols, N, limit, SWIGLU, BLOCK_N)


@triton.jit
def _gemv_store(acc, bias, UNDO: tl.constexpr, out_ptr, row, stride_out, cols, N, limit, SWIGLU: tl.constexpr,
                BLOCK_N: tl.constexpr):
    y = tl.sum(acc, 1) * UNDO + bias
    out_row = out_ptr + row.to(tl.int64) * stride_out
    if SWIGLU:  # rows of W alternate gate, linear
        gate, linear = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
        act = clamped_swiglu(gate, linear, limit)
        out_cols = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_row + out_cols, act.to(out_ptr.dtype.element_ty), mask=out_cols < N // 2)
    else:
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cols < N)

@triton.jit
def _moe_gemv_kernel(
    x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, counts_ptr, offsets_ptr,
    E, N, stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
    K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
    DECODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr,
    EVEN_N: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
):
    """The decode-sized grouped GEMM: out[r] = W_e x[source[r] // SOURCE_DIV] + b_e (then SwiGLU) for the
    up to BLOCK_T rows r of one tile, on CUDA cores (DECODE 0-2) or on tensor cores (DECODE 3: one row
    a tile; 4: 8 or 16 rows). The tile's row count selects a specialised body (a uniform branch), so a
    tile of one row does one row's multiplies."""
    pdl.wait_for_previous_kernel(PDL)
    expert, row0, row_end = find_tile(counts_ptr, offsets_ptr, tl.program_id(0), E, BLOCK_T, E_POW2)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    if DECODE == 3:  # DECODE_TENSOR_CORE_ROW: one row a tile, x in bf16
        tensor_core_row_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, N,
                       stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                       K_BYTES, GATHER, SOURCE_DIV, SWIGLU, BLOCK_N, BLOCK_K)
        return
    n = tl.minimum(row_end - row0, BLOCK_T)
    if DECODE == 4:  # DECODE_TENSOR_CORE_ROWS: up to 8 or 16 rows a tile, x in bf16
        tensor_core_rows_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, n, N,
                            stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                            K_BYTES, GATHER, SOURCE_DIV, SWIGLU, BLOCK_T // 8, BLOCK_N, BLOCK_K)
        return
    for t in tl.static_range(1, BLOCK_T + 1):
        if n == t:
            _gemv_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, N,
                       stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                       K_BYTES, GATHER, SOURCE_DIV, SWIGLU, DECODE, t, BLOCK_N, BLOCK_K, EVEN_N, UNROLL)
