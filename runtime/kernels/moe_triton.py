"""The experts in Triton: grouped MXFP4 GEMMs with the weights decoded in registers.

Layout of the work. The (token, expert) pairs are sorted by expert on the GPU (`plan`: one sort, one
histogram, one cumsum, no host sync). Each program of the GEMM owns one tile of up to BLOCK_T rows of
one expert and BLOCK_N of that expert's output features; it finds its tile from the per-expert counts
itself, so the grid has a fixed upper bound and nothing is planned on the host.

Operands are swapped: the program computes out^T = W x^T, with the decoded weight tile [BLOCK_N,
BLOCK_K] as the MMA's left operand and the few token rows as the right one. Weights are the big
operand at decode (1 to 64 tokens per expert), and as the left operand they stay in registers from
decode to MMA; the token dimension only needs to be a multiple of 8.

Decode. On the GPU, an inline-PTX routine turns 4 packed bytes (8 E2M1 values) and their 4 scale
bytes into 8 bfloat16 values with byte permutes, shifts and masks that drop each value's sign and
exponent/mantissa bits into a bf16's sign and lowest exponent/highest mantissa bits (which is the
value times 2^-126, exactly, subnormal for the smallest codes), then packed bf16 multiplies by 2^126
and by the byte's scale 2^(s-127) (bf16 bits s << 7). It is elementwise (each byte's two values
from that byte and its own scale), so the compiler may lay the packed tile out as it likes: it reads
the bytes from the pipeline's shared-memory buffer straight into the MMA's operand layout, where a
thread's k pairs (2j, 2j + 1) are exactly byte j, and the decoded tile is never written back (a
thread's bytes lie 4 apart, so they are read one at a time). The interpreter (CPU tests)
cannot run PTX: it uses an integer-only decode of the same values.

Token decoding (1 to 4 rows per expert): `_moe_gemv_kernel`, on CUDA cores, without tensor cores or
shared memory. A program owns up to 4 rows of one expert (a body specialised to the tile's row
count, by a uniform branch) and BLOCK_N output features; each thread streams 16-byte blocks of
packed weights (one 32-value MXFP4 block, one 128-bit load), decodes each word of 8 values with a
few byte-parallel logic ops into exact fp16 (the value times 2^-14, no scale), widens them to fp32
and multiplies them into each row of x with fp32 FMAs; the block's scale multiplies its partial sum
once. Every weight is read and decoded once per tile, whatever its row count. With one row a tile
(up to E / 2 rows) and bf16 x, the same kernel hands the multiply-adds to mma.sync instead, used on
its diagonal (`_gemv_mma_tile`: fewer instructions per weight, which is what bounds this kernel);
from 2 to 8 rows per expert it uses mma.sync as a real product, 8 tokens a tile as the MMA's
columns, each block decoded once for all of them (`_gemv_mma_rows_tile`).
`choose_tiles` picks the kernel and tiles by rows per expert; the grid depends only on (rows, N, E),
as for the MMAs.

Epilogues: mlp1 adds the bias and applies the clamped SwiGLU over interleaved (gate, linear) rows,
writing only the activation; mlp2 adds the bias and writes fp32 rows in sorted order, and
`combine` sums each token's four rows with their routing weights onto the residual, in a fixed order
(deterministic: no atomics), and can normalize the result for the next block (one launch fewer).

`moe_triton` is the single-rank MoE (gather, both GEMMs, weighted combine + residual); `expert_rows_triton`
is the drop-in for `moe.expert_rows` used with expert parallelism. Both are checked against the
references in tests/test_moe.py (CPU, interpreter) and its GPU tests (real shapes).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import triton
import triton.language as tl

from runtime.kernels import pdl

from runtime.kernels.moe import SWIGLU_ALPHA
from runtime.options import options

# The interpreter computes bf16 dots wrongly and runs no PTX (environment.md): fp32 operands and the
# integer decode there.
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined

def _decode_ptx(fold: bool) -> str:
    """PTX turning 4 packed bytes b0..b3 ($4) and their 4 scale bytes s0..s3 ($5) into 8 bf16 values,
    elementwise: $0, $1 hold the low nibbles' values of (b0, b1) and (b2, b3), $2, $3 the high
    nibbles'; each value is scaled by its own byte's scale, so the compiler may hand the asm any 4
    elements (the dot's operand layout groups bytes from two rows).

    A byte permute puts bytes j, j + 1 into the two 16-bit halves; then shifts and masks drop a
    nibble's exponent/mantissa bits into bits 6-8 and its sign into bit 15 of each half, which is the
    value times 2^-126; two packed bf16 multiplies apply 2^126 and 2^(s-127) (bf16 bits s << 7),
    folded into one when every scale byte is <= 128."""
    lines = ["{", ".reg .b32 s01, s23, a, b, v, big;", "mov.b32 big, 0x7E807E80;"]  # 2^126 in both halves
    pairs = {"s01": "0x4140", "s23": "0x4342"}  # prmt selectors: bytes (0, 1) or (2, 3) into the halves' low bytes
    for reg, selector in pairs.items():
        lines.append(f"prmt.b32 {reg}, $5, 0, {selector};")
        if fold:  # 2^126 * 2^(s-127) = 2^(s-1): bf16 exponent field s + 126 (needs s <= 128)
            lines.append(f"add.u32 {reg}, {reg}, 0x007E007E;")
        lines.append(f"shl.b32 {reg}, {reg}, 7;")
    # (output, bytes, payload shift, sign shift): low nibble bits 0-2 -> 6-8, 3 -> 15; high 4-6 -> 6-8, 7 -> 15
    for out, scale, payload, sign in ((0, "s01", 6, 12), (1, "s23", 6, 12), (2, "s01", 2, 8), (3, "s23", 2, 8)):
        lines += [f"prmt.b32 v, $4, 0, {pairs[scale]};", f"shl.b32 a, v, {payload};", "and.b32 a, a, 0x01C001C0;",
                  f"shl.b32 b, v, {sign};", "and.b32 b, b, 0x80008000;", "or.b32 a, a, b;"]
        if not fold:
            lines.append("mul.rn.bf16x2 a, a, big;")
        lines.append(f"mul.rn.bf16x2 ${out}, a, {scale};")
    return "\n".join(lines + ["}"])


_DECODE_PTX = tl.constexpr(_decode_ptx(fold=False))
_DECODE_PTX_FOLDED = tl.constexpr(_decode_ptx(fold=True))


@triton.jit
def _e2m1_scaled_bf16(code, scale):
    """Integer-only decode (the interpreter's path): E2M1 nibble times 2^(scale - 127) as bf16 bits.

    For exponent bits e > 0 the value is (1 + m/2) * 2^(e-1): bf16 exponent field scale - 1 + e,
    mantissa top bit m; for e == 0 it is m * 2^-1 (or zero). Exact for scales 1..252.
    """
    e = (code >> 1) & 3
    m = code & 1
    magnitude = ((scale - 1 + e) << 7) | tl.where(e > 0, m << 6, 0)
    magnitude = tl.where((e == 0) & (m == 0), 0, magnitude)
    bits = (((code >> 3) & 1) << 15) | magnitude
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _decode(packed, scale, PTX: tl.constexpr, FOLD: tl.constexpr):
    """uint8 tiles of packed bytes and their scale bytes -> (low-nibble values, high-nibble values) in bf16."""
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_DECODE_PTX_FOLDED if FOLD else _DECODE_PTX, "=r,=r,=r,=r,r,r",
                                           [packed, scale], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        code, s = packed.to(tl.int32), scale.to(tl.int32)
        lo = _e2m1_scaled_bf16(code & 15, s)
        hi = _e2m1_scaled_bf16(code >> 4, s)
    return lo, hi


@triton.jit
def _find_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of this program's tile, or expert == E where there is none.

    Expert e's rows [offset_e, offset_e + count_e) form cdiv(count_e, BLOCK_T) tiles, numbered
    expert after expert."""
    ex = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + ex, mask=ex < E, other=0)
    tiles = (counts + BLOCK_T - 1) // BLOCK_T
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= tile).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(ex < expert, tiles, 0), 0)
    count = tl.sum(tl.where(ex == expert, counts, 0), 0)
    offset = tl.load(offsets_ptr + tl.minimum(expert, E - 1))
    row0 = offset + (tile - first_tile) * BLOCK_T
    return expert, row0, offset + count


@triton.jit
def _moe_gemm_kernel(
    x_ptr, source_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, counts_ptr, offsets_ptr,
    E, N, K_BYTES, stride_x, stride_out, stride_be, stride_bn, stride_se, stride_sn, stride_biase, limit,
    GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr, DOT_FP32: tl.constexpr, PTX: tl.constexpr, FOLD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, PDL: tl.constexpr,
):
    """out[r] = W_e x[source[r] // SOURCE_DIV] + b_e for the rows r of one tile (then SwiGLU)."""
    pdl.wait_for_previous_kernel(PDL)
    # Programs next to each other in launch order share a row tile and sweep its expert's output
    # features: the rows (up to 256 x 5.6 KB) stay in L2 for all of them. Row tiles fastest (the
    # other way round) re-read every row tile from memory for each feature tile once x outgrows the
    # L2, as mlp2's input does at prefill (64k rows of 2880 bf16: 380 MB).
    pid_n = tl.program_id(0)
    expert, row0, row_end = _find_tile(counts_ptr, offsets_ptr, tl.program_id(1), E, BLOCK_T, E_POW2)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_T)
    row_ok = rows < row_end
    if GATHER:
        source = tl.load(source_ptr + rows, mask=row_ok, other=0) // SOURCE_DIV
    else:  # rows already in sorted order
        source = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    BYTES: tl.constexpr = BLOCK_K // 2  # packed byte j holds elements 2j (low nibble) and 2j+1 (high)
    kb = tl.arange(0, BYTES)
    kx = tl.arange(0, BLOCK_K)
    w_ptrs = blocks_ptr + expert * stride_be + cols[:, None] * stride_bn + kb[None, :]
    GROUPS: tl.constexpr = BYTES // 16  # one scale byte per 16 packed bytes
    kg = tl.arange(0, GROUPS)
    s_ptrs = scales_ptr + expert * stride_se + cols[:, None] * stride_sn + kg[None, :]
    x_ptrs = x_ptr + source[:, None].to(tl.int64) * stride_x + kx[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    # Triton's pipeliner streams the packed bytes and x through shared memory, but not the scales
    # (they reach the MMA only through the decode): load them one iteration ahead by hand, so their
    # latency hides behind a whole iteration instead of stalling each one.
    next_scale = tl.load(s_ptrs, mask=col_ok[:, None] & (kg < K_BYTES // 16)[None, :], other=127)
    for k0 in range(0, K_BYTES, BYTES):
        # K (2880 in gpt-oss) need not be a multiple of BLOCK_K; it is one of 32 (16 bytes), which
        # keeps the masks constant over 16-byte vectors.
        w_mask = col_ok[:, None] & ((k0 + kb) < K_BYTES)[None, :]
        packed = tl.load(w_ptrs + k0, mask=w_mask, other=0)
        scale = next_scale
        next_group = (k0 + BYTES) // 16 + kg
        next_scale = tl.load(s_ptrs + (k0 + BYTES) // 16, mask=col_ok[:, None] & (next_group < K_BYTES // 16)[None, :],
                             other=127)
        scale = tl.reshape(tl.broadcast_to(tl.reshape(scale, (BLOCK_N, GROUPS, 1)), (BLOCK_N, GROUPS, 16)),
                           (BLOCK_N, BYTES))
        lo, hi = _decode(packed, scale, PTX, FOLD)
        # byte j holds elements 2j (low nibble) and 2j + 1 (high): interleaved back into K order. The
        # compiler then loads the packed bytes straight into the MMA operand's register layout (each
        # thread's bytes decode to its own k pairs), with no round trip of the decoded tile through
        # shared memory, and x reaches the MMA from where the pipeliner put it.
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        x = tl.load(x_ptrs + 2 * k0, mask=row_ok[:, None] & ((2 * k0 + kx) < 2 * K_BYTES)[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x.to(tl.bfloat16)), acc)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    if SWIGLU:  # rows of W alternate gate, linear
        gate, linear = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_T)), (0, 2, 1)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + out_cols[:, None],
                 act.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (out_cols < N // 2)[:, None])
    else:
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + cols[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[None, :] & col_ok[:, None])


# ------------------------------------------------------------------------------ decode: the GEMV kernel
def _decode32_ptx(e4m3: bool) -> str:
    """PTX turning one 32-value block's 16 packed bytes ($32..$35: four words, byte 4w + b in word w)
    into 32 fp32 registers, $e = element e of the block times 2^-14 (fp16 route) or 2^-6 (e4m3
    route), exactly. Element e is nibble e % 8 of word e // 8 (even nibbles: low halves of bytes). No
    scale here: the kernel applies the block's scale once, to the block's partial sum.

    Both routes first rebuild each nibble as a byte in all 4 byte lanes of a word at once: the low
    nibbles (sign from bit 3, exponent/mantissa bits from 0-2) and the high ones (sign already at 7,
    exponent/mantissa bits from 4-6) with 3-4 logic ops per 4 values. fp16 route: the byte is the top
    byte of an fp16 (sign 7, exponent/mantissa bits 1-3: the value times 2^-14, subnormal for the code
    0.5); a byte permute or mask then moves two of them into the two halves of an fp16x2 with zero low
    bytes (11 logic ops per word). e4m3 route: the byte is an e4m3 (exponent/mantissa bits 2-4: the
    value times 2^-6) that the hardware widens two at a time to fp16x2 (7 logic ops + 4 F2FP per word).
    Then each fp16 becomes an fp32 exactly (cvt.f32.f16: HADD2.F32, on the FMA pipe)."""
    lines = ["{", ".reg .b32 a, b, lo, hi, p<4>;", ".reg .b16 l, h, q<8>;"]
    shift = 2 if e4m3 else 1  # where exponent/mantissa bits go in the byte
    mask = "0x1C1C1C1C" if e4m3 else "0x0E0E0E0E"
    for w in range(4):
        word = f"${32 + w}"
        lines += [f"shl.b32 a, {word}, {shift};", f"and.b32 a, a, {mask};", f"shl.b32 b, {word}, 4;",
                  "and.b32 b, b, 0x80808080;", "or.b32 lo, a, b;",  # low nibbles: elements 0, 2, 4, 6
                  f"shr.u32 a, {word}, {4 - shift};", f"and.b32 a, a, {mask};", f"and.b32 b, {word}, 0x80808080;",
                  "or.b32 hi, a, b;"]  # high nibbles: elements 1, 3, 5, 7
        if e4m3:
            lines += ["mov.b32 {l, h}, lo;", "cvt.rn.f16x2.e4m3x2 p0, l;", "cvt.rn.f16x2.e4m3x2 p1, h;",
                      "mov.b32 {l, h}, hi;", "cvt.rn.f16x2.e4m3x2 p2, l;", "cvt.rn.f16x2.e4m3x2 p3, h;",
                      "mov.b32 {q0, q2}, p0;", "mov.b32 {q4, q6}, p1;", "mov.b32 {q1, q3}, p2;", "mov.b32 {q5, q7}, p3;"]
        else:  # bytes 0 and 2 to the top of the halves, then bytes 1 and 3 (zero bytes below)
            lines += ["prmt.b32 p0, lo, 0, 0x2404;", "and.b32 p1, lo, 0xFF00FF00;",
                      "prmt.b32 p2, hi, 0, 0x2404;", "and.b32 p3, hi, 0xFF00FF00;",
                      "mov.b32 {q0, q4}, p0;", "mov.b32 {q2, q6}, p1;", "mov.b32 {q1, q5}, p2;", "mov.b32 {q3, q7}, p3;"]
        lines += [f"cvt.f32.f16 ${8 * w + n}, q{n};" for n in range(8)]
    return "\n".join(lines + ["}"])


_DECODE32_FP16 = tl.constexpr(_decode32_ptx(e4m3=False))
_DECODE32_E4M3 = tl.constexpr(_decode32_ptx(e4m3=True))
_DECODE32_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 32 + ["r"] * 4))
DECODE_INT, DECODE_FP16, DECODE_E4M3, DECODE_MMA, DECODE_MMA_ROWS = 0, 1, 2, 3, 4  # the GEMV's routes (integer: the interpreter's)


@triton.jit
def _e2m1_fp32(code):
    """Integer-only decode (the interpreter's route): E2M1 nibble -> its value times 2^-14 as fp32."""
    e = (code >> 1) & 3
    m = code & 1
    magnitude = tl.where(e > 0, ((e + 112) << 23) | (m << 22), m * (112 << 23))
    return (((code >> 3) << 31) | magnitude).to(tl.float32, bitcast=True)


@triton.jit
def _decode32(words, DECODE: tl.constexpr):
    """words [BLOCK_N, GPI, 4] int32 (one 32-value block per [row, group], 4 words each) -> 8 fp32
    tensors of the same shape: the n-th holds, at word position j, element 4n + j of the block, times
    2^-14 (DECODE 0 or 1) or 2^-6 (DECODE 2). So x for the n-th is 4 contiguous elements per block."""
    if DECODE == 0:
        j = tl.arange(0, 4)[None, None, :]
        w0 = tl.sum(tl.where(j == 0, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        w1 = tl.sum(tl.where(j == 1, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        w2 = tl.sum(tl.where(j == 2, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
        w3 = tl.sum(tl.where(j == 3, words, 0), 2)[:, :, None].to(tl.uint32, bitcast=True)
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
def _row_source(source_ptr, row, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr):
    if GATHER:
        return (tl.load(source_ptr + row) // SOURCE_DIV).to(tl.int64)
    return row.to(tl.int64)


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
               GROUPS: tl.constexpr, MASK_K: tl.constexpr, EVEN_N: tl.constexpr, DECODE: tl.constexpr, T: tl.constexpr,
               GPI: tl.constexpr):
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
    x0_ptr = x_ptr + _row_source(source_ptr, row0, GATHER, SOURCE_DIV) * stride_x
    x1_ptr = x_ptr + _row_source(source_ptr, row0 + R1, GATHER, SOURCE_DIV) * stride_x
    x2_ptr = x_ptr + _row_source(source_ptr, row0 + R2, GATHER, SOURCE_DIV) * stride_x
    x3_ptr = x_ptr + _row_source(source_ptr, row0 + R3, GATHER, SOURCE_DIV) * stride_x
    acc0 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, GPI), dtype=tl.float32)
    FULL: tl.constexpr = GROUPS // GPI  # chunks with every block inside K
    if UNROLL:
        for c in tl.static_range(FULL):
            acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                                x_offs, c, col_ok, kg, GROUPS, False, EVEN_N, DECODE, T, GPI)
    else:
        for c in range(FULL):
            acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                                x_offs, c, col_ok, kg, GROUPS, False, EVEN_N, DECODE, T, GPI)
    if GROUPS % GPI != 0:  # the last, partial chunk
        acc0, acc1, acc2, acc3 = _gemv_step(acc0, acc1, acc2, acc3, w_ptrs, s_ptrs, x0_ptr, x1_ptr, x2_ptr, x3_ptr,
                                            x_offs, FULL, col_ok, kg, GROUPS, True, EVEN_N, DECODE, T, GPI)
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
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
        out_cols = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_row + out_cols, act.to(out_ptr.dtype.element_ty), mask=out_cols < N // 2)
    else:
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cols < N)


# ------------------------------------------------------------------ decode: the one-row GEMV on tensor cores
# The CUDA-core GEMV above spends ~5 instructions per weight (decode to fp16, widen to fp32, FMA, x
# conversions) and is issue-bound at ~45% of the copy bandwidth. This route hands the multiply-adds
# to mma.sync (m16n8k16, bf16 in, fp32 accumulate) and decodes with the bf16 bit trick of `_decode_ptx`,
# about 4 instructions per weight. A GEMV has one column; the MMA is used on its diagonal:
#
# Lane l = 4g + t of a warp supplies A rows g and g + 8 at k slots {2t, 2t+1, 2t+8, 2t+9} and B column
# g at the same k slots, and receives D[g, 2t..2t+1] and D[g+8, 2t..2t+1]. So D[g, g] (and D[g+8, g])
# sums, over the four lanes 4g..4g+3 alone, each lane's A row g values times its own B values: if
# every lane puts into A two weight rows (an even row and the odd row after it, as two tensors of the
# same shape, so elementwise they always pair up) and into B the x values at the same k, D[g, g] is
# the dot product of the even row that lanes 4g..4g+3 share with x over the K positions they hold,
# whatever the other lanes do. Lanes 4g..4g+3 do share their rows: the weight tiles [BLOCK_N / 2,
# GPI * 4] int32 hold a chunk's words of a row contiguously, so the compiler gives each thread one
# block's 4 words (a 16-byte load) and puts consecutive lanes on consecutive blocks of a row (checked
# for Triton 3.6 and 3.9; `mma_route_verified` also checks it once per GPU on a probe, and falls back
# to the CUDA-core route if a compiler lays them out otherwise). The scale bytes and x are loaded
# inside the asm, from addresses, so that the weights are the only tensors whose layout the
# compiler chooses. D[g, g] sits in lane 4g + g // 2 (element g % 2, and g % 2 + 2 for the odd row);
# `_MMA_RESULT` keeps those and zeroes the rest, and a sum over the tile's blocks adds the partial
# dot products up.
#
# The block scale multiplies the decoded weights (bf16: exact, its exponent range is fp32's), times
# 2^-MMA_SCALE_OFFSET so that scale bytes up to 192 fit; the result is multiplied back at the end.
# Exact for scale bytes 66..192 (`mma_gemv_fits`); other tensors keep the CUDA-core route.
MMA_SCALE_OFFSET = 64


def _mma_pair_ptx(word: str, scale: str, out: str, i: int) -> list[str]:
    """bf16x2 `out` = (nibble i, nibble i + 4) of `word` times 2^(scale - 127 - MMA_SCALE_OFFSET): the
    sign/exponent/mantissa bits dropped into a bf16's (the value times 2^-126, `_decode_ptx`'s trick),
    then one packed multiply by `scale`, a bf16x2 of 2^(s - 1 - MMA_SCALE_OFFSET)."""
    payload, sign = 6 - 4 * i, 12 - 4 * i  # nibble i's bits 4i..4i+2 to 6..8, bit 4i + 3 to 15
    return [f"shl.b32 a, {word}, {payload};" if payload >= 0 else f"shr.u32 a, {word}, {-payload};",
            "and.b32 a, a, 0x01C001C0;",
            f"shl.b32 b, {word}, {sign};" if sign else f"mov.b32 b, {word};",
            "and.b32 b, b, 0x80008000;", "or.b32 a, a, b;", f"mul.rn.bf16x2 {out}, a, {scale};"]


def _mma_step_ptx(token_groups: int = 1) -> str:
    """One thread's 32-value block of an even and an odd weight row against x: 8 MMAs per group of 8
    tokens, accumulating into two sets of 4 fp32 registers per group (words 0-1 and words 2-3: two
    independent chains).

    Operands (pack 4, one block's 4 words per input), with G = token_groups and I = 8G the first
    input: the outputs $0..$(8G - 1), group j's chains at 8j..8j + 3 and 8j + 4..8j + 7; $I..$I+3
    the even row's words, $I+4..$I+7 the odd row's; $I+8 the address of the even row's scale byte,
    $I+12 the odd row's; $I+16+4j the address of group j's 32 bf16 x values of the block (16-byte
    aligned; word q holds values 2q, 2q + 1); then the accumulators coming in, in the outputs' order.
    Scales and x are loaded here, not by Triton, so that the only tensors the compiler lays out are
    the weights (see above: the lanes must follow the weight rows). The decoded weights of a block
    are reused by every group's MMAs."""
    first = 8 * token_groups
    words_a, words_b, scale_a, scale_b = first, first + 4, first + 8, first + 12
    x_addr = [first + 16 + 4 * j for j in range(token_groups)]
    acc_in = first + 16 + 4 * token_groups
    lines = ["{", f".reg .b32 a, b, sa, sb, ra<4>, rb<4>, bx<{4 * token_groups}>, x<{16 * token_groups}>;",
             f"ld.global.u8 sa, [${scale_a}];", f"ld.global.u8 sb, [${scale_b}];"]
    for j, addr in enumerate(x_addr):
        lines += [f"ld.global.v4.b32 {{x{16 * j + 4 * v}, x{16 * j + 4 * v + 1}, x{16 * j + 4 * v + 2}, "
                  f"x{16 * j + 4 * v + 3}}}, [${addr} + {16 * v}];" for v in range(4)]
    for reg in ("sa", "sb"):  # bf16x2 2^(s - 1 - offset): exponent field s + 126 - offset
        lines += [f"add.u32 {reg}, {reg}, {126 - MMA_SCALE_OFFSET};", f"shl.b32 a, {reg}, 23;",
                  f"shl.b32 {reg}, {reg}, 7;", f"or.b32 {reg}, {reg}, a;"]
    lines += [f"mov.b32 ${n}, ${acc_in + n};" for n in range(first)]
    for w in range(4):
        for i in range(4):
            lines += _mma_pair_ptx(f"${words_a + w}", "sa", f"ra{i}", i)
            lines += _mma_pair_ptx(f"${words_b + w}", "sb", f"rb{i}", i)
            for j in range(token_groups):
                # x values 8w + i (low half) and 8w + i + 4 (high half): words 4w + i // 2 and 4w + 2 + i // 2
                x = 16 * j
                lines.append(f"prmt.b32 bx{4 * j + i}, x{x + 4 * w + i // 2}, x{x + 4 * w + 2 + i // 2}, "
                             f"{'0x5410' if i % 2 == 0 else '0x7632'};")
        for j in range(token_groups):
            base = 8 * j + (0 if w < 2 else 4)
            acc = ", ".join(f"${base + n}" for n in range(4))
            for i0, i1 in ((0, 1), (2, 3)):
                lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{acc}}}, "
                             f"{{ra{i0}, rb{i0}, ra{i1}, rb{i1}}}, {{bx{4 * j + i0}, bx{4 * j + i1}}}, {{{acc}}};")
    return "\n".join(lines + ["}"])


def _mma_step_constraints(token_groups: int) -> str:
    return ",".join(["=f"] * 8 * token_groups + ["r"] * 8 + ["l"] * (8 + 4 * token_groups) + ["f"] * 8 * token_groups)


def _mma_result_ptx() -> str:
    """The two accumulator sets ($8-$11, $12-$15; pack 4) -> the even row's dot product in $0 and the
    odd row's in $4 where this lane holds the diagonal (lane 4g + t with t == g // 2: D[g, g] is
    element g % 2, D[g+8, g] element g % 2 + 2), zero in every other output."""
    lines = ["{", ".reg .b32 lane, g, t, h;", ".reg .pred holder, odd;", ".reg .f32 e<4>, ra, rb;",
             "mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 t, lane, 3;", "shr.u32 h, g, 1;",
             "setp.eq.u32 holder, t, h;", "and.b32 h, g, 1;", "setp.eq.u32 odd, h, 1;"]
    lines += [f"add.f32 e{n}, ${8 + n}, ${12 + n};" for n in range(4)]  # the two chains
    lines += ["selp.f32 ra, e1, e0, odd;", "selp.f32 rb, e3, e2, odd;",
              "selp.f32 $0, ra, 0f00000000, holder;", "selp.f32 $4, rb, 0f00000000, holder;"]
    lines += [f"mov.f32 ${n}, 0f00000000;" for n in (1, 2, 3, 5, 6, 7)]
    return "\n".join(lines + ["}"])


def _mma_rows_result_ptx() -> str:
    """A multi-token tile's two accumulator chains ($8-$11, $12-$15; pack 4: D[g, 2t], D[g, 2t + 1],
    D[g + 8, 2t], D[g + 8, 2t + 1] of lane 4g + t) -> the even row's sums for tokens 2t and 2t + 1
    in $0, $1 (repeated in $2, $3) and the odd row's in $4, $5 (repeated in $6, $7): each output
    element then holds one (feature, token) value, and the gate and linear halves of a token sit at
    the same element of two tensors."""
    lines = ["{", ".reg .f32 e<4>;"] + [f"add.f32 e{n}, ${8 + n}, ${12 + n};" for n in range(4)]
    lines += [f"mov.f32 ${n}, e{n % 2};" for n in range(4)] + [f"mov.f32 ${4 + n}, e{2 + n % 2};" for n in range(4)]
    return "\n".join(lines + ["}"])


_MMA_STEP = tl.constexpr(_mma_step_ptx())
_MMA_STEP_CONSTRAINTS = tl.constexpr(_mma_step_constraints(1))
_MMA_RESULT = tl.constexpr(_mma_result_ptx())
_MMA_RESULT_CONSTRAINTS = tl.constexpr(",".join(["=f"] * 8 + ["f"] * 8))
_MMA_UNDO = tl.constexpr(2.0 ** MMA_SCALE_OFFSET)
_MMA_STEP2 = tl.constexpr(_mma_step_ptx(2))
_MMA_STEP2_CONSTRAINTS = tl.constexpr(_mma_step_constraints(2))
_MMA_ROWS_RESULT = tl.constexpr(_mma_rows_result_ptx())


@triton.jit
def _gemv_mma_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row, N,
                   stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                   K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    x_row = x_ptr + _row_source(source_ptr, row, GATHER, SOURCE_DIV) * stride_x
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
            _MMA_STEP, _MMA_STEP_CONSTRAINTS, [wa, wb, sa, sb, xs, chain1, chain2],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    part_a, part_b = tl.inline_asm_elementwise(_MMA_RESULT, _MMA_RESULT_CONSTRAINTS, [chain1, chain2],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    ya = tl.sum(part_a, 1) * _MMA_UNDO
    yb = tl.sum(part_b, 1) * _MMA_UNDO
    if bias_ptr is not None:
        ya += tl.load(bias_ptr + expert * stride_biase + even, mask=even < N, other=0.0).to(tl.float32)
        yb += tl.load(bias_ptr + expert * stride_biase + even + 1, mask=even + 1 < N, other=0.0).to(tl.float32)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    if SWIGLU:  # even features are gates, odd ones linear: output feature i is the pair (2i, 2i + 1)
        gate = tl.minimum(ya, limit)
        linear = tl.minimum(tl.maximum(yb, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
        tl.store(out_row + even // 2, act.to(out_ptr.dtype.element_ty), mask=even + 1 < N)
    else:
        tl.store(out_row + even, ya.to(out_ptr.dtype.element_ty), mask=even < N)
        tl.store(out_row + even + 1, yb.to(out_ptr.dtype.element_ty), mask=even + 1 < N)


@triton.jit
def _x_rows(x_ptr, source_ptr, row0, n, token, stride_x, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr):
    """Addresses of the x rows of a tile's tokens `token` (a tensor); tokens past the tile's n rows
    read its last row (their results are never stored)."""
    return x_ptr + _row_source(source_ptr, row0 + tl.minimum(token, n - 1), GATHER, SOURCE_DIV) * stride_x


@triton.jit
def _gemv_mma_rows_store(e, o, bias_ptr, out_ptr, expert, row0, n, N, even, first_token, stride_out, stride_biase,
                         limit, SWIGLU: tl.constexpr):
    """Store one group of 8 tokens from `_MMA_ROWS_RESULT`'s tensors: element [r, 4t + j] (j < 2) is
    token first_token + 2t + j of the even feature `even[r]` (e) and the odd one after it (o)."""
    c = tl.arange(0, 16)[None, :]
    token = first_token + 2 * (c // 4) + c % 2
    keep = (c % 4 < 2) & (token < n)
    if bias_ptr is not None:
        e += tl.load(bias_ptr + expert * stride_biase + even, mask=even < N, other=0.0).to(tl.float32)
        o += tl.load(bias_ptr + expert * stride_biase + even + 1, mask=even + 1 < N, other=0.0).to(tl.float32)
    out_rows = out_ptr + (row0 + token).to(tl.int64) * stride_out
    if SWIGLU:  # even features are gates, odd ones linear: output feature i is the pair (2i, 2i + 1)
        gate = tl.minimum(e, limit)
        linear = tl.minimum(tl.maximum(o, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
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
def _gemv_mma_rows_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, n, N,
                        stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                        K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
                        TOKEN_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
                    _MMA_STEP, _MMA_STEP_CONSTRAINTS, [wa, wb, sa, sb, xs0, chain1, chain2],
                    dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
            else:
                xs1 = (x1_rows + group * 32).to(tl.int64)
                chain1, chain2, chain3, chain4 = tl.inline_asm_elementwise(
                    _MMA_STEP2, _MMA_STEP2_CONSTRAINTS, [wa, wb, sa, sb, xs0, xs1, chain1, chain2, chain3, chain4],
                    dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=4)
    features = even[:, None]
    e, o = tl.inline_asm_elementwise(_MMA_ROWS_RESULT, _MMA_RESULT_CONSTRAINTS, [chain1, chain2],
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
    _gemv_mma_rows_store(e * _MMA_UNDO, o * _MMA_UNDO, bias_ptr, out_ptr, expert, row0, n, N, features, 0, stride_out,
                         stride_biase, limit, SWIGLU)
    if TOKEN_GROUPS == 2:
        e, o = tl.inline_asm_elementwise(_MMA_ROWS_RESULT, _MMA_RESULT_CONSTRAINTS, [chain3, chain4],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        _gemv_mma_rows_store(e * _MMA_UNDO, o * _MMA_UNDO, bias_ptr, out_ptr, expert, row0, n, N, features, 8,
                             stride_out, stride_biase, limit, SWIGLU)


@triton.jit
def _moe_gemv_kernel(
    x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, counts_ptr, offsets_ptr,
    E, N, stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
    K_BYTES: tl.constexpr, GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
    DECODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
    EVEN_N: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
):
    """The decode-sized grouped GEMM: out[r] = W_e x[source[r] // SOURCE_DIV] + b_e (then SwiGLU) for the
    up to BLOCK_T rows r of one tile, on CUDA cores (DECODE 0-2) or, one row a tile, on tensor cores
    (DECODE 3). The tile's row count selects a specialised body (a uniform branch), so a tile of one
    row does one row's multiplies."""
    pdl.wait_for_previous_kernel(PDL)
    expert, row0, row_end = _find_tile(counts_ptr, offsets_ptr, tl.program_id(0), E, BLOCK_T, E_POW2)
    if expert >= E:
        return
    expert = expert.to(tl.int64)
    if DECODE == 3:  # DECODE_MMA: one row a tile, x in bf16
        _gemv_mma_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, N,
                       stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                       K_BYTES, GATHER, SOURCE_DIV, SWIGLU, BLOCK_N, BLOCK_K)
        return
    n = tl.minimum(row_end - row0, BLOCK_T)
    if DECODE == 4:  # DECODE_MMA_ROWS: up to 8 or 16 rows a tile, x in bf16
        _gemv_mma_rows_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, n, N,
                            stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                            K_BYTES, GATHER, SOURCE_DIV, SWIGLU, BLOCK_T // 8, BLOCK_N, BLOCK_K)
        return
    for t in tl.static_range(1, BLOCK_T + 1):
        if n == t:
            _gemv_tile(x_ptr, source_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, expert, row0, N,
                       stride_x, stride_out, stride_we, stride_se, stride_biase, limit,
                       K_BYTES, GATHER, SOURCE_DIV, SWIGLU, DECODE, t, BLOCK_N, BLOCK_K, EVEN_N, UNROLL)


@triton.jit
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


@triton.jit
def _combine_kernel(y_ptr, position_ptr, weight_ptr, residual_ptr, out_ptr, gain_ptr, normed_ptr, D, stride_y,
                    stride_res, stride_out, stride_normed, eps, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr,
                    NORM: tl.constexpr, PDL: tl.constexpr):
    """out[t] = residual[t] + sum_k weight[t, k] * y[position[t, k]], summed in k order (fp32).

    NORM (one program holds the whole row): also normed[t] = RMSNorm(out[t]) * gain, of out as
    rounded and stored, as add_rms_norm_triton(out, None, ...) would compute it: the next block's
    attention norm, without a launch of its own."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    if NORM:
        gain = tl.load(gain_ptr + d, mask=ok, other=0.0).to(tl.float32)  # a weight: before the wait
    pdl.wait_for_previous_kernel(PDL)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pos = tl.load(position_ptr + t * TOP_K + k).to(tl.int64)
        w = tl.load(weight_ptr + t * TOP_K + k)
        acc += w * tl.load(y_ptr + pos * stride_y + d, mask=ok, other=0.0)
    if residual_ptr is not None:
        acc += tl.load(residual_ptr + t * stride_res + d, mask=ok, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + d, out, mask=ok)
    if NORM:
        r = out.to(tl.float32)  # zero past D
        inv_rms = tl.rsqrt(tl.sum(r * r, 0) / D + eps)
        tl.store(normed_ptr + t * stride_normed + d, (r * inv_rms * gain).to(normed_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------- host side
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


PLAN_KERNEL_ROWS = 512  # up to here one program sorts (decode); beyond, torch.sort (prefill)


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
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty_like(counts)
    _, order = torch.sort(flat, stable=True)
    counts.zero_().scatter_add_(0, flat.long(), torch.ones_like(flat))
    torch.sub(torch.cumsum(counts, 0, dtype=torch.int32), counts, out=offsets)
    position = torch.empty_like(flat)
    position[order] = torch.arange(m, dtype=torch.int32, device=dev)
    return Plan(order.to(torch.int32), position, counts, offsets, m, num_experts)


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_t: int  # rows of one expert per program
    block_n: int  # output features per program
    block_k: int  # reduction elements per step (a multiple of 32 for the GEMV)
    num_warps: int
    num_stages: int
    kernel: str = "mma"  # "mma": _moe_gemm_kernel (tensor cores); "gemv": _moe_gemv_kernel (block_t <= 4, or 8 or 16)
    # the GEMV's route on the GPU: "fp16", "e4m3" (see _decode32_ptx), "mma" (_gemv_mma_tile, one row a tile)
    # or "mma_rows" (_gemv_mma_rows_tile, 8 or 16 rows a tile)
    decode: str = "fp16"
    unroll: bool = True  # the GEMV's K loop: unrolled (loads can run ahead) or a loop (fewer registers)


# Where the CUDA-core GEMV beats the tensor-core kernel (scripts/bench_moe.py --sweep, gpt-oss-20b on
# an H100, 2026-11-25): with at most one row per expert on average (rows <= experts); from two rows
# per expert on (16 tokens of 20b) the tensor-core kernel wins. One-row tiles while at most half the
# experts have a row (1-4 tokens of 20b: 54 vs 98 us at 1 token, 139 vs 168 at 4), two-row tiles up to
# one row per expert (8 tokens: 202 vs 208 us). The one-row tiles' tensor-core route (2026-11-25,
# same bench): 4 tokens 55.6 + 85.1 -> 37.4 + 64.7 us for the two GEMMs; in a batch-1 decode graph
# 2,332 -> 2,167 us a step (profile_decode --ab GPT_OSS_MOE_MMA_GEMV).
GEMV_ROWS_PER_EXPERT = 1
MMA_ROWS_PER_EXPERT = 8  # the multi-row tensor-core GEMV up to here, as measured (GPT_OSS_MOE_MMA_ROWS=0: not at all)
GEMV_SINGLE_ROWS = 2
CUDA_CORE_DECODE = {True: "fp16", False: "e4m3"}  # one-row tiles' CUDA-core route, mlp1 (swiglu) and mlp2


def choose_tiles(rows: int, num_experts: int, swiglu: bool) -> Tiles:
    """Tile shapes by rows per expert, the fastest in scripts/bench_moe.py --sweep on an H100: decode
    is bound by streaming (and decoding) the weight bytes, prefill by the MMAs. mlp1 (swiglu) and
    mlp2 differ only in the GEMV's decode route, which the sweep found faster each way."""
    per_expert = rows / max(1, min(rows, num_experts))
    if rows * GEMV_SINGLE_ROWS <= num_experts:  # "mma" where grouped_mxfp4 can take it (mma_gemv_fits)
        mma = options.moe_tensor_core_gemv  # the bench's A/B switch
        # 16 features a tile for both GEMMs; 1024-value chunks with at most one row per 8 experts (1 token
        # of 20b, up to 4 of 120b), else 512. Batch-1 decode graph of 20b (profile_decode.py --ab, one
        # H100, 2026-11-26): 16 x 1024 1,941.7 against 16 x 512's 1,996.6 us a step, 8 x 1024 1,966.6
        # against 1,982.9; at batch 4, 16 x 1024 lost (3,679.9 against 3,655.5 us). bench_moe.py timed
        # 16 x 1024 fastest of 14 one-row tiles for both GEMMs of 120b at 1 and 4 tokens. (An earlier
        # sweep had 8 x 1024 fastest for 20b's mlp1 alone at one token, within noise end to end.)
        wide = mma and not INTERPRET and rows * 8 <= num_experts
        tiles = Tiles(1, 16, 1024 if wide else 512, 4, 1, "gemv", decode="mma" if mma else CUDA_CORE_DECODE[swiglu])
    elif per_expert <= MMA_ROWS_PER_EXPERT and not INTERPRET and options.moe_tensor_core_rows:
        # scripts/bench_moe.py --sweep --routes mma_rows, two runs on two H100s (2026-11-26), 8 and 64 tokens of
        # 20b and 64 of 120b: 64 features, 4 warps and 8 rows a tile were fastest or within ~3% of it
        # everywhere, and won in the batch-8 decode graph (5,264 against 5,537 us a step with 32 features
        # and 2 warps). 256-value chunks (two blocks a lane) gained 7-12% at up to 2 rows per expert for
        # mlp1 and for 120b's mlp2 (245 against 274 us at 64 tokens), lost 3-7% for 20b's mlp2 there, and
        # lost at 8 rows per expert (64 tokens of 20b: 20% fewer tokens/s end to end with mlp1 at 256).
        wide = per_expert <= 2 and (swiglu or num_experts >= 128)
        return Tiles(8, 64, 256 if wide else 128, 4, 1, "gemv", decode="mma_rows")
    elif per_expert <= GEMV_ROWS_PER_EXPERT:
        tiles = Tiles(2, 32, 256, 4, 1, "gemv", decode="e4m3" if swiglu else "fp16", unroll=False)
    else:
        return mma_tiles(rows, num_experts, swiglu)
    # The interpreter runs programs one after another in Python, each at about the same cost whatever
    # its tile: the CPU tests of the whole model get the GEMV with 8x fewer, wider programs.
    # (It runs no PTX, so no tensor-core route either.)
    return dataclasses.replace(tiles, block_n=128, decode=CUDA_CORE_DECODE[swiglu]) if INTERPRET else tiles


def mma_tiles(rows: int, num_experts: int, swiglu: bool) -> Tiles:
    """The tensor-core kernel's tiles by rows per expert (the fastest in scripts/bench_moe.py --sweep
    on an H100)."""
    per_expert = rows / max(1, min(rows, num_experts))
    if per_expert <= 2:  # re-swept with the GEMV in place (2 rows per expert: 189 + 106 us at 16 tokens)
        return Tiles(8, 64, 128, 4, 4) if swiglu else Tiles(8, 32, 128, 2, 4)
    # Re-swept with the operand-layout decode and feature-tile-fastest grid (scripts/bench_moe.py --sweep
    # --routes mma --tiles ..., H100, 2026-11-26; both GEMMs agreed at every size): 20b at 128, 256,
    # 512, 1024, 4096 and 16384 tokens, 120b at 4096. 8 warps with 256-row tiles once an expert has
    # more than 128 rows (4096 tokens of 20b: 1,308 + 678 us; the kernel before took 2,608-2,637 us for
    # both, with 128-row tiles).
    if per_expert <= 16:
        return Tiles(32, 128, 64, 8, 3)  # 229 + 132 us at 128 tokens of 20b
    if per_expert <= 48:
        return Tiles(64, 128, 64, 4, 3)  # 266 + 143 us at 256 tokens
    if per_expert <= 128:
        return Tiles(128, 64, 64, 4, 3)  # 506 + 261 us at 1024 tokens; 2,062 + 1,021 at 4096 of 120b
    return Tiles(256, 128, 64, 8, 4)


def gemv_tiles_ok(tiles: Tiles) -> bool:
    """Shapes the GEMV supports. Its decode takes each 32-value block's 4 words from one thread
    (inline asm with pack=4), which holds when a thread loads 16 bytes per block: at least one
    block per thread in a step (smaller tensors get narrower loads) and power-of-two sizes. The
    tensor-core routes need lanes in fours along the blocks and no lane left without a weight row:
    "mma" one row a tile (see _gemv_mma_tile), "mma_rows" 8 or 16 rows and chunks of 4, 8 or 16 blocks,
    so that a row's 4 lanes span a chunk and the lanes with the same position in their four hold the
    same K positions (see _gemv_mma_rows_tile)."""
    pow2 = all(v > 0 and v & (v - 1) == 0 for v in (tiles.block_n, tiles.block_k, tiles.num_warps))
    groups = tiles.block_k // 32
    if tiles.decode == "mma":  # each half tile covers the CTA's lanes: 32 // groups rows a warp
        return (pow2 and tiles.block_t == 1 and 4 <= groups <= 32
                and tiles.block_n // 2 >= (32 // groups) * tiles.num_warps)
    if tiles.decode == "mma_rows":  # 4 lanes along a row's 4 blocks, 8 rows a warp, warps along the rows
        return (pow2 and tiles.block_t in (8, 16) and tiles.block_k in (128, 256, 512)
                and tiles.block_n // 2 >= 8 * tiles.num_warps)
    return (pow2 and 1 <= tiles.block_t <= 4 and tiles.block_n >= 2 and 64 <= tiles.block_k <= 1024
            and tiles.block_n * groups >= 32 * tiles.num_warps and tiles.decode in ("fp16", "e4m3"))


def _checked_once(scales: torch.Tensor, name: str, check) -> bool:
    """check(scales) (a host sync), computed once per tensor contents and remembered on the tensor
    with its version counter, which any in-place write (such as loading a checkpoint into it) bumps."""
    version = -1 if scales.is_inference() else scales._version  # inference tensors keep no counter
    cached = getattr(scales, name, None)
    if cached is None or cached[0] != version:
        cached = (version, bool(check(scales)) if scales.numel() else True)
        setattr(scales, name, cached)
    return cached[1]


def scales_fold(scales: torch.Tensor) -> bool:
    """Whether every scale byte is <= 128, so the decode needs one multiply per pair, not two."""
    return _checked_once(scales, "_gpt_oss_fold", lambda s: s.max() <= 128)


def mma_gemv_fits(x: torch.Tensor, scales: torch.Tensor, tiles: Tiles) -> bool:
    """Whether the tensor-core GEMV (either route) takes this call: bf16 x with 16-byte aligned rows on a
    Hopper GPU, every scale byte in 66..192 (exact in its bf16 operands, see MMA_SCALE_OFFSET), and
    the route verified on this GPU with these tiles (`mma_route_verified`)."""
    if INTERPRET or not x.is_cuda or x.dtype != torch.bfloat16 or not gemv_tiles_ok(tiles):
        return False
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16 or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if not _checked_once(scales, "_gpt_oss_mma_range", lambda s: (s.min() >= 66) & (s.max() <= 192)):
        return False
    return mma_route_verified(x.device, tiles)


_MMA_VERIFIED: dict[tuple, bool] = {}
PROBE_REFERENCE_TILES = Tiles(1, 32, 256, 4, 1, "gemv", decode="fp16", unroll=False)  # CUDA cores, any K


def mma_route_verified(device: torch.device, tiles: Tiles) -> bool:
    """Whether the tensor-core GEMV gives the CUDA-core route's results (to fp32 rounding) on a probe,
    checked once per GPU and tiles: its diagonal trick needs the compiler to put four consecutive
    lanes on one weight row (see above), the multi-row route also the rows' order over the lanes, which
    a Triton version could lay out otherwise. Not during a CUDA graph capture (the check syncs): there
    an unchecked route is not taken."""
    key = (device.index, tiles)
    if key not in _MMA_VERIFIED:
        if torch.cuda.is_current_stream_capturing():
            return False
        _MMA_VERIFIED[key] = True  # the probe's own calls take the route
        gen = torch.Generator(device=device).manual_seed(0)
        E, N, K = 2, 2 * tiles.block_n, 2 * tiles.block_k + 64  # two tiles, two full chunks and a partial one
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device=device, generator=gen)
        scales = torch.randint(116, 125, (E, N, K // 32), dtype=torch.uint8, device=device, generator=gen)
        bias = torch.randn(E, N, device=device, generator=gen).to(torch.bfloat16)
        # expert 1 spans two tiles, the second partial; expert 0 has one partial tile
        experts = [1] * (tiles.block_t + 3) + [0] * 3
        x = torch.randn(len(experts), K, device=device, generator=gen).to(torch.bfloat16)
        p = plan(torch.tensor(experts, device=device), E)
        mma = grouped_mxfp4(x, None, 1, p, blocks, scales, bias, torch.float32, tiles=tiles)
        ref = grouped_mxfp4(x, None, 1, p, blocks, scales, bias, torch.float32, tiles=PROBE_REFERENCE_TILES)
        ok = bool(((mma - ref).norm() <= 1e-5 * ref.norm()).item())
        if not ok:
            warnings.warn(f"the MoE's tensor-core GEMV disagrees with the CUDA-core one on {device} with {tiles}: "
                          "using the CUDA-core route")
        _MMA_VERIFIED[key] = ok
    return _MMA_VERIFIED[key]


SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (Hopper has 227 KB; the epilogue needs some)


def grouped_mxfp4(x: torch.Tensor, source: torch.Tensor | None, source_div: int, p: Plan, blocks: torch.Tensor,
                  scales: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                  swiglu_limit: float | None = None, tiles: Tiles | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = W_e x[source[i] // source_div] + b_e for sorted rows i of expert e (then SwiGLU);
    source None reads x[i] (x already sorted); bias None adds none."""
    E, N, groups, group_bytes = blocks.shape
    assert x.shape[1] == groups * 32 and group_bytes == 16, (x.shape, blocks.shape)
    tiles = tiles or choose_tiles(p.num_rows, E, swiglu_limit is not None)
    if out is None:
        out = torch.empty((p.num_rows, N // 2 if swiglu_limit is not None else N), dtype=out_dtype, device=x.device)
    if p.num_rows == 0:
        return out
    if tiles.kernel == "gemv" and tiles.decode in ("mma", "mma_rows") and not mma_gemv_fits(x, scales, tiles):
        swiglu = swiglu_limit is not None  # the CUDA-core GEMV takes up to 4 rows a tile, the GEMM any
        tiles = dataclasses.replace(tiles, decode=CUDA_CORE_DECODE[swiglu]) if tiles.block_t == 1 \
            else mma_tiles(p.num_rows, E, swiglu)
    row_tiles, feature_tiles = p.max_tiles(tiles.block_t), triton.cdiv(N, tiles.block_n)
    if tiles.kernel == "gemv":  # weights contiguous within an expert, each 32-value block 16-byte aligned
        assert gemv_tiles_ok(tiles), tiles
        assert blocks.stride()[1:] == (groups * 16, 16, 1) and blocks.stride(0) % 16 == 0 \
            and blocks.data_ptr() % 16 == 0 and scales.stride()[1:] == (groups, 1), (blocks.stride(), scales.stride())
        decode = DECODE_INT if INTERPRET else {"fp16": DECODE_FP16, "e4m3": DECODE_E4M3, "mma": DECODE_MMA,
                                             "mma_rows": DECODE_MMA_ROWS}[tiles.decode]
        _moe_gemv_kernel[(row_tiles, feature_tiles)](
            x, source, blocks.view(torch.int32), scales, bias, out, p.counts, p.offsets,
            E, N, x.stride(0), out.stride(0), blocks.stride(0) // 4, scales.stride(0), 0 if bias is None else bias.stride(0),
            float(swiglu_limit or 0.0),
            K_BYTES=groups * group_bytes, GATHER=source is not None, SOURCE_DIV=source_div, SWIGLU=swiglu_limit is not None,
            DECODE=decode, BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
            E_POW2=triton.next_power_of_2(E), EVEN_N=N % tiles.block_n == 0, UNROLL=tiles.unroll,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl.launch_args(x.device),
        )
        return out
    assert row_tiles < 2 ** 16, f"{p.num_rows} rows in tiles of {tiles.block_t}: too many for the grid's second axis"
    # The tiles are chosen for bf16 x; fp32 x (the fp32 model) doubles each pipeline stage's x tile,
    # so keep the stages that fit in shared memory.
    stage_bytes = tiles.block_t * tiles.block_k * x.element_size() + tiles.block_n * tiles.block_k // 2
    num_stages = max(1, min(tiles.num_stages, SHARED_MEMORY_BUDGET // stage_bytes))
    _moe_gemm_kernel[(feature_tiles, row_tiles)](  # feature tiles fastest (see the kernel)
        x, source, blocks, scales, bias, out, p.counts, p.offsets,
        E, N, groups * group_bytes, x.stride(0), out.stride(0),
        blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), 0 if bias is None else bias.stride(0),
        float(swiglu_limit or 0.0),
        GATHER=source is not None, SOURCE_DIV=source_div, SWIGLU=swiglu_limit is not None, DOT_FP32=INTERPRET or x.dtype == torch.float32,
        PTX=not INTERPRET, FOLD=scales_fold(scales), BLOCK_T=tiles.block_t, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        E_POW2=triton.next_power_of_2(E), num_warps=tiles.num_warps, num_stages=num_stages,
        **pdl.launch_args(x.device),
    )
    return out


def combine(y: torch.Tensor, position: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor | None,
            out_dtype: torch.dtype, norm: tuple[torch.Tensor, float] | None = None):
    """[T, D]: residual + sum_k weights[t, k] * y[position[t, k]] (fp32 sums, one rounding).

    norm = (gain [D], eps): returns (that, its RMSNorm times gain), both out_dtype, in one launch."""
    T, top_k = weights.shape
    D = y.shape[1]
    out = torch.empty((T, D), dtype=out_dtype, device=y.device)
    normed = torch.empty_like(out) if norm is not None else None
    if T:
        block_d = triton.next_power_of_2(D) if norm is not None else 1024  # NORM: a whole row a program
        gain, eps = norm if norm is not None else (None, 0.0)
        _combine_kernel[(T, triton.cdiv(D, block_d))](
            y, position, weights.float().contiguous(), residual, out, gain, normed, D, y.stride(0),
            residual.stride(0) if residual is not None else 0, out.stride(0), D, float(eps), TOP_K=top_k,
            BLOCK_D=block_d, NORM=norm is not None, num_warps=min(16, max(4, block_d // 512)),
            **pdl.launch_args(y.device))
    return out if norm is None else (out, normed)


def moe_triton(h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, mlp1_blocks, mlp1_scales,
               mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias, limit: float,
               residual: torch.Tensor | None = None, reduce=None, first: bool = True,
               rows: Plan | None = None, next_norm: tuple[torch.Tensor, float] | None = None):
    """The MoE on a rank holding every expert (or the same slice of every expert's intermediate
    dimension): [T, d] = residual + sum_k w_k * expert_k(h).

    h [T, d]; expert_ids, weights [T, k]. Rows are never copied out of h: the first GEMM gathers
    token order[i] // k for sorted pair i. With the experts split over ranks, `reduce` sums over
    them: each rank's mlp2 gives partial products, the `first` rank alone adds mlp2's bias and the
    residual, and the combined rows (fp32, one per token, not one per token and expert) are summed.
    `rows`: the (token, expert) pairs already sorted by expert (router_triton.route_and_plan).
    next_norm = (gain, eps): returns (output, its RMSNorm times gain), the next block's attention
    norm, computed in the combine's launch when there is nothing to reduce."""
    T, top_k = expert_ids.shape
    p = rows if rows is not None else plan(expert_ids, mlp1_blocks.shape[0])
    act = grouped_mxfp4(h, p.order, top_k, p, mlp1_blocks, mlp1_scales, mlp1_bias, h.dtype, swiglu_limit=limit)
    y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias if first else None, torch.float32)
    out_dtype = h.dtype if residual is None else residual.dtype
    if reduce is None:
        return combine(y, p.position, weights, residual, out_dtype, norm=next_norm)
    out = reduce(combine(y, p.position, weights, residual if first else None, torch.float32)).to(out_dtype)
    if next_norm is None:
        return out
    from runtime.kernels.rmsnorm_triton import add_rms_norm_triton

    return add_rms_norm_triton(out, None, *next_norm)


def expert_rows_triton(x, experts, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                       limit: float, reduce=None) -> torch.Tensor:
    """The Triton version of moe.expert_rows: rows through their experts, [m, d] fp32, bias included."""
    p = plan(experts, mlp1_blocks.shape[0])
    act = grouped_mxfp4(x, p.order, 1, p, mlp1_blocks, mlp1_scales, mlp1_bias, x.dtype, swiglu_limit=limit)
    if reduce is None:
        y = grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, mlp2_bias, torch.float32)
    else:  # split experts: sum the partial products across ranks first, then add the bias once
        y = reduce(grouped_mxfp4(act, None, 1, p, mlp2_blocks, mlp2_scales, torch.zeros_like(mlp2_bias),
                                 torch.float32))
        y += mlp2_bias[experts.long()[p.order.long()]].float()
    return y[p.position.long()]


assert SWIGLU_ALPHA == 1.702  # the kernel hard-codes the same constant
