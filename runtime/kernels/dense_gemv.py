"""A Triton GEMV for few rows: `linear_gemv(x, weight, bias)` is `torch.nn.functional.linear`.

At decode batch 1 the attention projections are matrix-vector products: the QKV weight
(5120 x 2880 bf16, 29.5 MB) and the output projection (2880 x 4096, 23.6 MB) are read once per
token, so their time is the weight's bytes over the memory bandwidth. cuBLAS reaches 69-76% of an
H100's copy bandwidth there (its out-projection GEMV is split-K plus a reduce kernel). Here one
launch, no split-K: each program owns BLOCK_N whole weight rows and streams them along K in
BLOCK_K-wide steps of 16-byte loads, keeping fp32 partial sums per (row, 16-byte column group) in
registers; every x row (up to FEW_ROWS) is applied to the same loaded weight tile, so each weight
byte is read once. The partial sums are added up once at the end, the bias added in fp32 and the
result rounded once to x's dtype: the reference up to the order of the fp32 sums.

The reference is torch.nn.functional.linear itself.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from runtime.kernels import pdl

# The interpreter computes bf16 math wrongly (environment.md): fp32 operands there, on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FEW_ROWS = 4  # x rows a program applies to one weight tile: one accumulator tile each
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _row_fma(acc, w, x_ptrs, k_ok, MASKED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_K // VEC] + the VEC-wide sums of w * x, in fp32."""
    if MASKED:
        x = tl.load(x_ptrs, mask=k_ok, other=0.0)
    else:
        x = tl.load(x_ptrs)
    return acc + tl.sum(w * x.to(tl.float32), 2)


@triton.jit
def _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, k0, xk, K, M: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK_K step: the weight tile at k0 loaded once and applied to each of the M rows of x;
    MASKED for the last, partial step."""
    if MASKED:
        k_ok = (k0 + xk) < K
        w = tl.load(w_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)
    else:
        k_ok = None
        w = tl.load(w_ptrs + k0).to(tl.float32)
    return _apply(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, k0, xk, k_ok, M, MASKED)


@triton.jit
def _apply(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, k0, xk, k_ok, M: tl.constexpr, MASKED: tl.constexpr):
    """A loaded weight tile (fp32) at k0 applied to each of the M rows of x."""
    acc0 = _row_fma(acc0, w, x_ptr + k0 + xk, k_ok, MASKED)
    if M > 1:
        acc1 = _row_fma(acc1, w, x_ptr + stride_xm + k0 + xk, k_ok, MASKED)
    if M > 2:
        acc2 = _row_fma(acc2, w, x_ptr + 2 * stride_xm + k0 + xk, k_ok, MASKED)
    if M > 3:
        acc3 = _row_fma(acc3, w, x_ptr + 3 * stride_xm + k0 + xk, k_ok, MASKED)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_row(y_row_ptr, acc, b, n, n_ok):
    tl.store(y_row_ptr + n, (tl.sum(acc, 1) + b).to(y_row_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym, M: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
                 PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    # Past-the-end rows re-read row N-1 (their sums are never stored): the loop's loads need no row mask.
    rows = tl.minimum(n, N - 1).to(tl.int64)
    # Tiles are [BLOCK_N, BLOCK_K // VEC, VEC] with VEC elements = one 16-byte load: the products are
    # summed over VEC inside a thread each step, so the fp32 accumulators are VEC times smaller than
    # the weight tile (more of the register file left for loads in flight).
    kk = tl.arange(0, BLOCK_K // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    w_ptrs = w_ptr + rows[:, None, None] * K + kk[None, :, :]
    # x's offsets broadcast to the weight tile's shape give x's load the tile's layout: each thread
    # loads just the columns it multiplies (the compiler drops the repeats over rows), with no
    # layout conversion through shared memory in the loop.
    xk = kk[None, :, :] + 0 * n[:, None, None]
    acc0 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K // VEC), dtype=tl.float32)
    # The first step's weight tile is loaded before waiting for the kernel that wrote x (with PDL
    # this overlaps that kernel's end), masked in case it is also the last; then whole BLOCK_K steps
    # unmasked, then one masked tail (2880 = 2 x 1024 + 832). STAGES > 1 has Triton prefetch the
    # next steps' tiles through shared memory (cp.async; x's broadcast tiles are staged too, so that
    # memory grows with M); 1 leaves the loop plain.
    k_ok = xk < K
    w = tl.load(w_ptrs, mask=k_ok, other=0.0).to(tl.float32)
    pdl.wait_for_previous_kernel(PDL)
    acc0, acc1, acc2, acc3 = _apply(acc0, acc1, acc2, acc3, w, x_ptr, stride_xm, 0, xk, k_ok, M, True)
    k_full = K - K % BLOCK_K
    for k0 in tl.range(BLOCK_K, k_full, BLOCK_K, num_stages=STAGES):
        acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, k0, xk, K, M, False)
    if (k_full < K) & (k_full > 0):  # K < BLOCK_K: the first step was the tail
        acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, k_full, xk, K, M, True)
    if HAS_BIAS:
        b = tl.load(b_ptr + rows).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    _store_row(y_ptr, acc0, b, n, n_ok)
    if M > 1:
        _store_row(y_ptr + stride_ym, acc1, b, n, n_ok)
    if M > 2:
        _store_row(y_ptr + 2 * stride_ym, acc2, b, n, n_ok)
    if M > 3:
        _store_row(y_ptr + 3 * stride_ym, acc3, b, n, n_ok)


@functools.cache
def _num_sms(index: int | None) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 132  # an H100 SXM: the interpreter only needs a plausible grid
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_config(M: int, N: int, K: int, sms: int = 132) -> dict:
    """Launch parameters for x [M, K] @ weight [N, K]^T: an untuned starting point (compiled offline
    for sm_90, not yet timed; scripts/bench_dense_gemv.py --sweep tries the alternatives).

    The kernel is bound by the weight's bytes, so the aim is enough loads in flight on every SM with
    the whole grid resident at once (one wave, no tail of idle SMs):
    - BLOCK_N: the largest of 8, 4, 2 that still gives 4 programs per SM (5120 rows -> 8, 640
      programs on 132 SMs; 2880 or 2560 rows -> 4, 720 or 640 programs).
    - BLOCK_K: 8 KiB of bf16 weight per program per step (BLOCK_N * BLOCK_K = 4096: four 16-byte
      loads a thread with 4 warps), so 512 at BLOCK_N 8 and 1024 at BLOCK_N 4; halved while
      M * BLOCK_N * BLOCK_K > 8192, since each x row's values take registers too (M = 3-4). Compiled
      for sm_90 this is 47-72 registers a thread at the projections' shapes (M = 4 at 8 x 512 would
      be 112), so 7+ programs of 4 warps fit an SM and the whole grid runs in one wave.
    - STAGES 1: no shared-memory pipelining; the resident grid alone keeps about 20-45 KiB of loads
      in flight per SM.
    """
    block_n = 8
    while block_n > 2 and triton.cdiv(N, block_n) < 4 * sms:
        block_n //= 2
    block_k = 4096 // block_n
    while block_k > 128 and M * block_n * block_k > 8192:
        block_k //= 2
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))  # no wider than K (tiny shapes)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": 1, "num_warps": 4}


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear_gemv takes x [M, K] and weight [N, K]: 1 <= M <= FEW_ROWS, unit stride along K,
    a contiguous weight of x's dtype, both on one CUDA device (or CPU tensors under the interpreter)."""
    if x.dim() != 2 or weight.dim() != 2 or not 1 <= x.shape[0] <= FEW_ROWS or x.shape[1] != weight.shape[1]:
        return False
    if x.shape[1] == 0 or weight.shape[0] == 0 or x.stride(1) != 1 or not weight.is_contiguous():
        return False
    if x.dtype != weight.dtype or x.dtype not in _DTYPES or x.device != weight.device:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N] -> [M, N] in x.dtype (fp32 sums, rounded once).

    `out` ([M, N], x.dtype, unit stride along N) receives the result if given. `config` overrides
    any of gemv_config's BLOCK_N, BLOCK_K, STAGES, num_warps (the bench's sweep).
    """
    assert fits(x, weight), "linear_gemv: see fits()"
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == x.dtype and bias.is_contiguous() and bias.device == x.device
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(1) == 1 and out.device == x.device
    cfg = gemv_config(M, N, K, _num_sms(x.device.index if x.is_cuda else None))
    if INTERPRET:  # the interpreter runs programs one by one at a cost each: few, wide ones (CPU tests)
        cfg.update(BLOCK_N=min(64, triton.next_power_of_2(N)), BLOCK_K=min(256, max(16, triton.next_power_of_2(K))))
    cfg.update(config)
    block_n = cfg.pop("BLOCK_N")
    block_k = cfg.pop("BLOCK_K")
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, out, N, K, x.stride(0), out.stride(0),
        M=M, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        VEC=min(16 // x.element_size(), block_k), **cfg, **pdl.launch_args(x.device))
    return out
