"""The prefill-sized grouped GEMM on tensor cores (wgmma): `_moe_gemm_kernel`, MXFP4 weights decoded
in registers.

Each program owns one tile of up to BLOCK_T rows of one expert and BLOCK_N of that expert's output
features (`common.find_tile`). Operands are swapped: the program computes out^T = W x^T, with the
decoded weight tile [BLOCK_N, BLOCK_K] as the MMA's left operand and the few token rows as the right
one. Weights are the big operand at small batches (up to 64 tokens per expert), and as the left
operand they stay in registers from decode to MMA; the token dimension only needs to be a multiple
of 8.

Decode (`ptx.decode_ptx`) is elementwise (each byte's two values from that byte and its own scale), so
the compiler may lay the packed tile out as it likes: it reads the bytes from the pipeline's
shared-memory buffer straight into the MMA's operand layout, where a thread's k pairs (2j, 2j + 1)
are exactly byte j, and the decoded tile is never written back. In a block's original order lane q of
a quad needs bytes q, q + 4, q + 8, q + 12 (one load each); in kernel order (mxfp4.quad_transpose)
they are one word, and a thread's 16 bytes of a step come in one ldmatrix. The interpreter (CPU
tests) cannot run PTX: it uses an integer-only decode of the same values (`_e2m1_scaled_bf16`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.moe_triton_details.common import clamped_swiglu, find_tail_tile, find_tile
from runtime.kernels.moe_triton_details.ptx import decode_ptx
from runtime.kernels.step_kernel import step_kernel

_DECODE_PTX = tl.constexpr(decode_ptx(fold=False))
_DECODE_PTX_FOLDED = tl.constexpr(decode_ptx(fold=True))


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
    """uint8 tiles of packed bytes and their scale bytes -> (low-nibble, high-nibble values) in bf16."""
    if PTX:
        lo, hi = tl.inline_asm_elementwise(_DECODE_PTX_FOLDED if FOLD else _DECODE_PTX, "=r,=r,=r,=r,r,r",
                                           [packed, scale], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                           pack=4)
    else:
        code, s = packed.to(tl.int32), scale.to(tl.int32)
        lo = _e2m1_scaled_bf16(code & 15, s)
        hi = _e2m1_scaled_bf16(code >> 4, s)
    return lo, hi

@triton.jit
def _k_step(acc, next_scale, w_ptrs, s_ptrs, x_ptrs, k0, K_BYTES, col_ok, row_ok, kb, kx, kg,
            MASK_K: tl.constexpr, PTX: tl.constexpr, FOLD: tl.constexpr, DOT_FP32: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K step of the GEMM: decode the packed weights of bytes k0.. with the scales loaded a
    step ahead, multiply with x, and load the next step's scales. MASK_K: bytes from K_BYTES on are
    past the end of K (the last step of a K that is no multiple of BLOCK_K)."""
    BYTES: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BYTES // 16
    w_mask = col_ok[:, None] & ((k0 + kb) < K_BYTES)[None, :] if MASK_K else col_ok[:, None]
    packed = tl.load(w_ptrs + k0, mask=w_mask, other=0)
    scale = next_scale
    next_group = (k0 + BYTES) // 16 + kg
    next_scale = tl.load(s_ptrs + (k0 + BYTES) // 16,
                         mask=col_ok[:, None] & (next_group < K_BYTES // 16)[None, :], other=127)
    scale = tl.reshape(tl.broadcast_to(tl.reshape(scale, (BLOCK_N, GROUPS, 1)), (BLOCK_N, GROUPS, 16)),
                       (BLOCK_N, BYTES))
    lo, hi = _decode(packed, scale, PTX, FOLD)
    # Back into K order: byte 4q + i of a block (kernel order, mxfp4.quad_transpose) is its byte
    # q + 4i, and byte j holds elements 2j (low nibble) and 2j + 1 (high). The compiler then loads
    # the packed bytes straight into the MMA operand's register layout (each thread's bytes decode
    # to its own k pairs, lane q of a quad's 4 bytes of a block one word: one ldmatrix for a
    # thread's 16 bytes), with no round trip of the decoded tile through shared memory, and x
    # reaches the MMA from where the pipeliner put it.
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K // 32, 4, 4, 2))
    w = tl.reshape(tl.permute(w, (0, 1, 3, 2, 4)), (BLOCK_N, BLOCK_K))
    x_mask = row_ok[:, None] & ((2 * k0 + kx) < 2 * K_BYTES)[None, :] if MASK_K else row_ok[:, None]
    x = tl.load(x_ptrs + 2 * k0, mask=x_mask, other=0.0)
    if DOT_FP32:
        acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, tl.trans(x.to(tl.bfloat16)), acc)
    return acc, next_scale


@step_kernel("tail_slots")
def _moe_gemm_kernel(
    x_ptr, source_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, counts_ptr, offsets_ptr,
    E, N, K_BYTES, stride_x, stride_out, stride_be, stride_bn, stride_se, stride_sn, stride_biase, limit,
    tail_slots,
    GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr, DOT_FP32: tl.constexpr,
    PTX: tl.constexpr, FOLD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, PDL: tl.constexpr, EVEN_K: tl.constexpr,
    TAIL_T: tl.constexpr,
):
    """out[r] = W_e x[source[r] // SOURCE_DIV] + b_e for the rows r of one tile (then SwiGLU).

    The grid's second axis: `tail_slots` short tiles first (TAIL_T > 0: an expert's last rows, when
    at most TAIL_T are left after its full BLOCK_T tiles), then the BLOCK_T tiles. Every tile decodes
    its expert's weights once, whatever its rows, but its MMAs cost in proportion to its width: a few
    rows left over take a narrow tile, not a whole one, so they cost about the decode alone."""
    pdl.wait_for_previous_kernel(PDL)
    # Programs next to each other in launch order share a row tile and sweep its expert's output
    # features: the rows (up to 256 x 5.6 KB) stay in L2 for all of them. Row tiles fastest (the
    # other way round) re-read every row tile from memory for each feature tile once x outgrows the
    # L2, as mlp2's input does at prefill (64k rows of 2880 bf16: 380 MB).
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    args = (x_ptr, source_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr)
    strides = (stride_x, stride_out, stride_be, stride_bn, stride_se, stride_sn, stride_biase)
    if TAIL_T > 0:  # the short tiles first: a narrower copy of the tile's code
        if tile < tail_slots:
            expert, row0, row_end = find_tail_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T, TAIL_T, E_POW2)
            if expert < E:
                _gemm_tile(args, strides, expert, row0, row_end, pid_n, N, K_BYTES, limit, GATHER, SOURCE_DIV,
                           SWIGLU, DOT_FP32, PTX, FOLD, TAIL_T, BLOCK_N, BLOCK_K, EVEN_K)
        tile -= tail_slots  # negative for the short tiles' programs: they are done
    if tile >= 0:
        expert, row0, row_end = find_tile(counts_ptr, offsets_ptr, tile, E, BLOCK_T, E_POW2, TAIL_T)
        if expert < E:
            _gemm_tile(args, strides, expert, row0, row_end, pid_n, N, K_BYTES, limit, GATHER, SOURCE_DIV,
                       SWIGLU, DOT_FP32, PTX, FOLD, BLOCK_T, BLOCK_N, BLOCK_K, EVEN_K)


@triton.jit
def _gemm_tile(args, strides, expert, row0, row_end, pid_n, N, K_BYTES, limit,
               GATHER: tl.constexpr, SOURCE_DIV: tl.constexpr, SWIGLU: tl.constexpr,
               DOT_FP32: tl.constexpr, PTX: tl.constexpr, FOLD: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Rows [row0, row_end) (at most BLOCK_T) of `expert`, output features pid_n * BLOCK_N.."""
    x_ptr, source_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr = args
    stride_x, stride_out, stride_be, stride_bn, stride_se, stride_sn, stride_biase = strides
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
    # K (2880 in gpt-oss) need not be a multiple of BLOCK_K; it is one of 32 (16 bytes). The loop
    # runs the whole steps without K masks (masked loads of the packed bytes cost byte loads and
    # selects: 4x the loop's instructions at BLOCK_K 128) and a last, masked step takes the rest.
    k_whole = K_BYTES if EVEN_K else K_BYTES // BYTES * BYTES
    for k0 in range(0, k_whole, BYTES):
        acc, next_scale = _k_step(acc, next_scale, w_ptrs, s_ptrs, x_ptrs, k0, K_BYTES, col_ok, row_ok, kb,
                                  kx, kg, False, PTX, FOLD, DOT_FP32, BLOCK_N, BLOCK_K)
    if not EVEN_K:
        if k_whole < K_BYTES:
            acc, next_scale = _k_step(acc, next_scale, w_ptrs, s_ptrs, x_ptrs, k_whole, K_BYTES, col_ok,
                                      row_ok, kb, kx, kg, True, PTX, FOLD, DOT_FP32, BLOCK_N, BLOCK_K)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[:, None]
    if SWIGLU:  # rows of W alternate gate, linear
        gate, linear = tl.split(tl.permute(tl.reshape(acc, (BLOCK_N // 2, 2, BLOCK_T)), (0, 2, 1)))
        act = clamped_swiglu(gate, linear, limit)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + out_cols[:, None],
                 act.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & (out_cols < N // 2)[:, None])
    else:
        tl.store(out_ptr + rows[None, :].to(tl.int64) * stride_out + cols[:, None],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[None, :] & col_ok[:, None])
