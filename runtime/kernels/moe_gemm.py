"""Grouped MXFP4 GEMM for the experts, in Triton, with the weights decoded in registers.

Rows arrive sorted by expert. Each program computes a BLOCK_M x BLOCK_N tile of one expert's
output: it streams that expert's packed bytes and scale bytes for BLOCK_N output rows, turns each
nibble into its E2M1 value with a few integer ops (no lookup table), scales it by 2^(s - 127), and
feeds the tensor cores in bf16 with an fp32 accumulator. Epilogue: bias, and for mlp1 the clamped
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
def _e2m1(code):
    """E2M1 nibble -> fp32 value: sign, 2-bit exponent, 1-bit mantissa (exponent 0: subnormal 0 or 0.5)."""
    exp = (code >> 1) & 3
    man = (code & 1).to(tl.float32)
    normal = (1.0 + 0.5 * man) * tl.exp2((exp - 1).to(tl.float32))
    value = tl.where(exp == 0, 0.5 * man, normal)
    return tl.where((code & 8) != 0, -value, value)


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
    kb = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K tile
    ks = tl.arange(0, BLOCK_K // 32)  # scales of one K tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = blocks_ptr + expert * stride_be + cols[:, None] * stride_bn
    s_base = scales_ptr + expert * stride_se + cols[:, None] * stride_sn
    for k0 in range(0, K, BLOCK_K):
        # K (2880 in gpt-oss) need not be a multiple of BLOCK_K: the tail reads zeros.
        packed = tl.load(w_base + (k0 // 2 + kb)[None, :], mask=col_ok[:, None] & (k0 // 2 + kb < K // 2)[None, :],
                         other=0)
        scale = tl.load(s_base + (k0 // 32 + ks)[None, :], mask=col_ok[:, None] & (k0 // 32 + ks < K // 32)[None, :],
                        other=127)
        low = _e2m1(packed & 15)
        high = _e2m1(packed >> 4)
        w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # element 2j = low nibble, 2j+1 = high
        factor = tl.exp2(scale.to(tl.float32) - 127.0)  # [BLOCK_N, BLOCK_K / 32]
        w = tl.reshape(tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 32)) * factor[:, :, None], (BLOCK_N, BLOCK_K))
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
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
