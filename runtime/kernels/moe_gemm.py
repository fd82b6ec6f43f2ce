"""Grouped MXFP4 GEMM for the experts, in Triton, with the weights decoded in registers.

Rows arrive sorted by expert. Each program computes a BLOCK_M x BLOCK_N tile of one expert's
output: it streams that expert's packed bytes and scale bytes for BLOCK_N output rows, turns each
nibble and its block's scale straight into bfloat16 bits with a few integer ops (exact: no lookup
table, no float math), and feeds the tensor cores in bf16 with an fp32 accumulator. Epilogue: bias, and for mlp1 the clamped
SwiGLU over the interleaved (gate, linear) column pairs, so only the activation is written.

`expert_rows_triton` is the drop-in for `moe.expert_rows` (same arguments, same result) and is
checked against it in tests/test_moe_gemm.py (CPU, interpreter) and tests/test_gpu.py (real shapes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from runtime.kernels.moe import SWIGLU_ALPHA

# The interpreter computes bf16 dots wrongly (environment.md); it gets fp32 operands instead.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _e2m1_scaled_bf16(code, scale):
    """E2M1 nibble times 2^(scale - 127), built directly as bfloat16 bits (exact, no float math).

    For exponent bits e > 0 the value is (1 + m/2) * 2^(e-1), so its bf16 exponent field is
    e - 1 + 127 + (scale - 127) = scale - 1 + e and its mantissa's top bit is m; for e == 0 it is
    m * 0.5 = 2^-1, exponent field scale - 1 + 0, mantissa 0 (or the value is zero). Scales 1..252
    stay in range, which covers every weight a real checkpoint holds.
    """
    e = (code >> 1) & 3
    m = code & 1
    magnitude = ((scale - 1 + e) << 7) | tl.where(e > 0, m << 6, 0)
    magnitude = tl.where((e == 0) & (m == 0), 0, magnitude)
    bits = (((code >> 3) & 1) << 15) | magnitude
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _grouped_mxfp4_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    tile_expert_ptr, tile_row_ptr, tile_end_ptr,
    N, K, stride_x, stride_out,
    stride_be, stride_bn, stride_se, stride_sn, stride_biase,
    limit,
    SWIGLU: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    kb = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K tile: byte j holds elements 2j (low) and 2j+1 (high)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = blocks_ptr + expert * stride_be + cols[:, None] * stride_bn
    s_base = scales_ptr + expert * stride_se + cols[:, None] * stride_sn
    x_base = x_ptr + rows[:, None] * stride_x
    for k0 in range(0, K, BLOCK_K):
        byte = k0 // 2 + kb
        # K (2880 in gpt-oss) need not be a multiple of BLOCK_K: the tail reads zeros.
        w_mask = col_ok[:, None] & (byte < K // 2)[None, :]
        packed = tl.load(w_base + byte[None, :], mask=w_mask, other=0).to(tl.int32)
        scale = tl.load(s_base + (byte // 16)[None, :], mask=w_mask, other=127).to(tl.int32)  # one per 16 bytes
        w_even = _e2m1_scaled_bf16(packed & 15, scale)  # [BLOCK_N, BLOCK_K / 2]
        w_odd = _e2m1_scaled_bf16(packed >> 4, scale)
        # Even and odd input elements meet the low and high nibbles in two half-depth dots, so the
        # nibbles never have to be interleaved in registers.
        a_mask = row_ok[:, None] & (byte < K // 2)[None, :]
        a_even = tl.load(x_base + (2 * byte)[None, :], mask=a_mask, other=0.0)
        a_odd = tl.load(x_base + (2 * byte + 1)[None, :], mask=a_mask, other=0.0)
        if DOT_FP32:
            acc += tl.dot(a_even.to(tl.float32), tl.trans(w_even.to(tl.float32)), input_precision="ieee")
            acc += tl.dot(a_odd.to(tl.float32), tl.trans(w_odd.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a_even.to(tl.bfloat16), tl.trans(w_even))
            acc += tl.dot(a_odd.to(tl.bfloat16), tl.trans(w_odd))
    acc += tl.load(bias_ptr + expert * stride_biase + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        gate, linear = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        act = gate * tl.sigmoid(1.702 * gate) * (linear + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + rows[:, None] * stride_out + out_cols[None, :], act.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (out_cols < N // 2)[None, :])
    else:
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def tiles_by_expert(experts_sorted: torch.Tensor, num_experts: int, block_m: int):
    """(expert, first row, end row) of every BLOCK_M tile over rows sorted by expert."""
    counts = torch.bincount(experts_sorted, minlength=num_experts).tolist()
    tile_expert, tile_row, tile_end, start = [], [], [], 0
    for e, n in enumerate(counts):
        for r in range(start, start + n, block_m):
            tile_expert.append(e)
            tile_row.append(r)
            tile_end.append(start + n)
        start += n
    dev = experts_sorted.device
    return (torch.tensor(tile_expert, dtype=torch.int32, device=dev), torch.tensor(tile_row, dtype=torch.int32, device=dev),
            torch.tensor(tile_end, dtype=torch.int32, device=dev))


def grouped_mxfp4(x: torch.Tensor, tiles, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                  out_dtype: torch.dtype, swiglu_limit: float | None = None, block_m: int = 16,
                  block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y[r] = W_{e(r)} x[r] + b_{e(r)} (then SwiGLU if a limit is given) for rows sorted by expert."""
    E, N, groups, _ = blocks.shape
    K = groups * 32
    assert x.shape[1] == K and N % block_n == 0, (x.shape, blocks.shape, block_n)
    if out is None:
        out = torch.empty((x.shape[0], N // 2 if swiglu_limit is not None else N), dtype=out_dtype, device=x.device)
    tile_expert, tile_row, tile_end = tiles
    if tile_expert.numel() == 0:
        return out
    grid = (tile_expert.numel(), N // block_n)  # K is looped inside, its tail masked
    _grouped_mxfp4_kernel[grid](
        x, blocks, scales, bias, out, tile_expert, tile_row, tile_end,
        N, K, x.stride(0), out.stride(0),
        blocks.stride(0), blocks.stride(1), scales.stride(0), scales.stride(1), bias.stride(0),
        float(swiglu_limit or 0.0),
        SWIGLU=swiglu_limit is not None, DOT_FP32=INTERPRET or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def expert_rows_triton(x, experts, mlp1_blocks, mlp1_scales, mlp1_bias, mlp2_blocks, mlp2_scales, mlp2_bias,
                       limit: float, reduce=None, block_m: int = 16) -> torch.Tensor:
    """The Triton version of moe.expert_rows: rows through their experts, [m, d] fp32, bias included."""
    order = torch.argsort(experts, stable=True)
    sorted_experts = experts[order]
    tiles = tiles_by_expert(sorted_experts, mlp1_blocks.shape[0], block_m)
    xs = x[order].contiguous()
    act = grouped_mxfp4(xs, tiles, mlp1_blocks, mlp1_scales, mlp1_bias, x.dtype, swiglu_limit=limit, block_m=block_m)
    if reduce is None:
        y = grouped_mxfp4(act, tiles, mlp2_blocks, mlp2_scales, mlp2_bias, torch.float32, block_m=block_m)
    else:  # split experts: sum the partial products across ranks first, then add the bias once
        y = reduce(grouped_mxfp4(act, tiles, mlp2_blocks, mlp2_scales, torch.zeros_like(mlp2_bias),
                                 torch.float32, block_m=block_m)) + mlp2_bias[sorted_experts].float()
    out = torch.empty_like(y)
    out[order] = y
    return out


assert SWIGLU_ALPHA == 1.702  # the kernel hard-codes the same constant
