"""The MoE's last step: each token's top-k rows weighted and summed onto the residual, in a fixed
order (deterministic: no atomics), optionally with the next block's RMSNorm in the same launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from runtime.kernels import pdl


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
        # A zero weight's row counts as zeros: a pair whose expert another rank holds was never
        # computed, and whatever its row holds (NaN too) must not reach the sum.
        acc += tl.where(w != 0.0, w * tl.load(y_ptr + pos * stride_y + d, mask=ok, other=0.0), 0.0)
    if residual_ptr is not None:
        acc += tl.load(residual_ptr + t * stride_res + d, mask=ok, other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + d, out, mask=ok)
    if NORM:
        r = out.to(tl.float32)  # zero past D
        inv_rms = tl.rsqrt(tl.sum(r * r, 0) / D + eps)
        normed = (r * inv_rms * gain).to(normed_ptr.dtype.element_ty)
        tl.store(normed_ptr + t * stride_normed + d, normed, mask=ok)
