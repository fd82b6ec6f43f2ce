"""Residual add + RMSNorm in Triton: the add that ends one block and the norm that starts the next,
in one pass over each row (read x and delta, write the residual and the normed row). Unfused, the
sum is written, read back for the norm, and the norm makes more fp32 temporaries.

A memory-bound elementwise kernel: it exists to touch each byte once. Its reference is
`rmsnorm.add_rms_norm`; tests/test_rmsnorm.py checks one against the other (CPU: Triton's
interpreter in fp32; GPU: bf16 at the real shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.step_kernel import step_kernel

MAX_WIDTH = 8192  # one row lives in registers: 8192 fp32 values over 16 warps is 16 per thread
_TILE = 4096  # elements per program: 8 KB of bf16 per tensor, enough in flight to stream at HBM speed


@triton.jit
def rms_norm_rows(rf, gain, n, eps):
    """RMSNorm of fp32 rows rf [R, C] (zeros past column n) times gain [C], in fp32: the arithmetic
    of every kernel here that normalizes rows, shared so that their outputs agree bit for bit."""
    inv_rms = tl.rsqrt(tl.sum(rf * rf, axis=1) / n + eps)
    return rf * inv_rms[:, None] * gain[None, :]


@step_kernel("M")
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, gain_ptr, res_ptr, out_ptr,
    M, N, stride_x, stride_d, stride_r, stride_o, eps,
    HAS_DELTA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride can pass 2^31
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N  # widths such as 2880 are not powers of two: the tail is masked and reads zeros
    mask = (rows < M)[:, None] & col_ok[None, :]
    gain = tl.load(gain_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # a weight: before the wait
    pdl.wait_for_previous_kernel(PDL)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + rows[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
        # Like torch's x + delta: fp32 sum, one rounding to the residual's dtype; the norm reads the
        # rounded residual, as the unfused model does.
        r = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + rows[:, None] * stride_r + cols[None, :], r, mask=mask)
    else:
        r = x
    y = rms_norm_rows(r.to(tl.float32), gain, N, eps)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as a [rows, width] view with unit column stride (copies only when no such view exists)."""
    t = t.reshape(-1, width)
    return t if t.stride(1) == 1 else t.contiguous()


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, gain: torch.Tensor, eps: float, *,
                        residual_out: torch.Tensor | None = None,
                        normed_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta in x's dtype, rms_norm of it): the Triton version of rmsnorm.add_rms_norm.

    x, delta [..., width] (width <= 8192; delta may be fp32 while x is bf16, as torch would add
    them, the sum is rounded once to x's dtype); with delta None the residual is x itself, not a
    copy (and residual_out is ignored). residual_out (may be x itself: an in-place add) and
    normed_out let the caller supply the outputs: contiguous, shaped and typed like x.
    """
    width = x.shape[-1]
    if width > MAX_WIDTH:
        raise ValueError(f"add_rms_norm_triton holds a row in registers: width {width} > {MAX_WIDTH}")
    assert gain.shape == (width,) and gain.is_contiguous(), gain.shape
    x2 = _rows(x, width)
    M = x2.shape[0]
    normed = torch.empty(x.shape, dtype=x.dtype, device=x.device) if normed_out is None else normed_out
    n2 = normed.view(-1, width)
    if delta is None:
        residual, d2, r2 = x, x2, x2  # never read or written: HAS_DELTA is off
    else:
        assert delta.shape == x.shape, (delta.shape, x.shape)
        d2 = _rows(delta, width)
        residual = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual_out is None \
            else residual_out
        r2 = residual.view(-1, width)
    if M == 0:
        return residual, normed
    block_n = triton.next_power_of_2(width)
    # Narrow rows share a program so each program still moves a few KB; 2880-wide rows go one each.
    block_m = min(triton.next_power_of_2(M), max(1, _TILE // block_n))
    num_warps = min(16, max(1, block_m * block_n // 512))  # 4096 elements -> 8 warps, 16 per thread
    _add_rms_norm_kernel[(triton.cdiv(M, block_m),)](
        x2, d2, gain, r2, n2, M, width, x2.stride(0), d2.stride(0), r2.stride(0), n2.stride(0), float(eps),
        HAS_DELTA=delta is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        **pdl.launch_args(x.device),
    )
    return residual, normed
