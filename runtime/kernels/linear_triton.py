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

Given `rope=` (a QKV projection: q heads, then k, then v, head_dim wide each), the epilogue also does
rope_triton.rope_qk_triton's work, saving that launch in a decode step: it rotates the q and k
heads of the fp32 sums, rounds every output once, stores q, k, v as rope_qk_triton would leave them
and, given `cache=`, k and v at each row's slot of the KV pages. A program then owns whole rotation
pairs (features i and i + D/2 of one head, _pair_rows): two runs of BLOCK_N / 2 rows of a head while
BLOCK_N <= D, BLOCK_N / D whole heads beyond. So BLOCK_N, the grid and the weight streaming stay the
GEMV's (8 rows, 640 programs at gpt-oss's QKV; whole heads of 64 would leave 80 programs for 132
SMs). Rounding once instead of twice (GEMV, then RoPE), it is within 3u * c * (|a| + |b|) of the two
launches for a pair (a, b), u the dtype's unit roundoff; in fp32 the two are equal.

The reference is torch.nn.functional.linear itself (with rope.rope_qk for `rope=`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from runtime.kernels import pdl
from runtime.kernels.kv_store_triton import to_cache
from runtime.kernels.rope_triton import rope_cos_sin, rope_rotate
from runtime.options import options

# The interpreter computes bf16 math wrongly (docs/environment.md): fp32 operands there, on CPU tensors.
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined
FEW_ROWS = 4  # x rows a program applies to one weight tile: one accumulator tile each
# The fused QKV + RoPE launch's tiles: narrower and rolled, since the RoPE epilogue on top of eight rows'
# unrolled loads costs more than unrolling saves (docs/performance.md, "Attention and dense GEMV constants").
ROPE_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 512, "UNROLL": False}
MAX_UNROLL = 16  # K steps unrolled at most (more: the loop, so compile time and code size stay small)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Rope(NamedTuple):
    """RoPE in linear_gemv's epilogue, for a weight of (num_q_heads + 2 num_kv_heads) * head_dim rows:
    what rope_qk_triton takes besides qkv and the cache (in another order: head_dim comes last there)."""
    positions: torch.Tensor  # [M] integers, one per row of x
    inv_freq: torch.Tensor  # [head_dim / 2] fp32
    concentration: float
    head_dim: int
    num_q_heads: int
    num_kv_heads: int


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
def _pair_rows(BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr):
    """This program's output features when it rotates: [BLOCK_N // (2 PAIRS) heads, 2 halves, PAIRS]
    flattened, so every feature's partner (i <-> i + D/2) is in the same program. PAIRS = D/2 gives
    whole heads, consecutive; fewer give HEAD_DIM // (2 PAIRS) programs per head."""
    j = tl.arange(0, BLOCK_N)
    per_head = HEAD_DIM // (2 * PAIRS)
    head = tl.program_id(0) // per_head * (BLOCK_N // (2 * PAIRS)) + j // (2 * PAIRS)
    col = tl.program_id(0) % per_head * PAIRS + j % PAIRS
    return head * HEAD_DIM + (j // PAIRS) % 2 * (HEAD_DIM // 2) + col


@triton.jit
def _halves(v, PAIRS: tl.constexpr):
    """A vector in _pair_rows' order as (its first-half entries, their partners), [heads, PAIRS] each."""
    return tl.split(tl.permute(tl.reshape(v, (v.shape[0] // (2 * PAIRS), 2, PAIRS)), (0, 2, 1)))


@triton.jit
def _store_rope_row(y_row_ptr, y, n, m, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr, slots_ptr,
                    stride_slot, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PAIRS: tl.constexpr, CACHE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Row m's fp32 outputs y at features n (_pair_rows): q and k heads rotated by row m's position as
    rope_qk_triton does (shared helpers), each output rounded once; with CACHE, k and v also stored
    at row m's slot of the pages [slots, KV_HEADS, HEAD_DIM]. Positions and slots are step inputs:
    read here, after the kernel's PDL wait."""
    first, second = _halves(y, PAIRS)
    at, _ = _halves(n, PAIRS)  # features of `first`; their partners are HEAD_DIM // 2 further
    head, col = at // HEAD_DIM, at % HEAD_DIM
    ok = head < Q_HEADS + 2 * KV_HEADS  # a last program of whole heads may pass the end
    rotated = head < Q_HEADS + KV_HEADS
    pos = tl.load(pos_ptr + m).to(tl.float32)
    cos, sin = rope_cos_sin(pos, tl.load(inv_freq_ptr + col), concentration, LIBDEVICE)
    r_first, r_second = rope_rotate(first, second, cos, sin)
    first = tl.where(rotated, r_first, first).to(y_row_ptr.dtype.element_ty)  # v heads pass unrotated
    second = tl.where(rotated, r_second, second).to(y_row_ptr.dtype.element_ty)
    tl.store(y_row_ptr + at, first, mask=ok)
    tl.store(y_row_ptr + at + HEAD_DIM // 2, second, mask=ok)
    if CACHE:
        slot = tl.load(slots_ptr + m).to(tl.int64)
        kv_head = tl.where(rotated, head - Q_HEADS, head - Q_HEADS - KV_HEADS)
        row = slot * stride_slot + kv_head * HEAD_DIM + col
        is_k = rotated & (head >= Q_HEADS)
        is_v = ok & (head >= Q_HEADS + KV_HEADS)
        tl.store(k_ptr + row, to_cache(first, k_ptr), mask=is_k)
        tl.store(k_ptr + row + HEAD_DIM // 2, to_cache(second, k_ptr), mask=is_k)
        tl.store(v_ptr + row, to_cache(first, v_ptr), mask=is_v)
        tl.store(v_ptr + row + HEAD_DIM // 2, to_cache(second, v_ptr), mask=is_v)


@triton.jit
def _store_row(y_ptr, stride_ym, acc, b, n, n_ok, m: tl.constexpr, pos_ptr, inv_freq_ptr, concentration,
               k_ptr, v_ptr, slots_ptr, stride_slot, ROPE: tl.constexpr, CACHE: tl.constexpr,
               Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr,
               LIBDEVICE: tl.constexpr):
    """Row m of the output: its partial sums added up, the bias added, rounded once (after RoPE with ROPE)."""
    y = tl.sum(acc, 1) + b
    if ROPE:
        _store_rope_row(y_ptr + m * stride_ym, y, n, m, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr,
                        slots_ptr, stride_slot, Q_HEADS, KV_HEADS, HEAD_DIM, PAIRS, CACHE, LIBDEVICE)
    else:
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym,
                 pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr, slots_ptr, stride_slot,
                 M: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 VEC: tl.constexpr, STAGES: tl.constexpr, UNROLL_STEPS: tl.constexpr, ROPE: tl.constexpr,
                 CACHE: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAIRS: tl.constexpr, LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
    if ROPE:
        n = _pair_rows(BLOCK_N, HEAD_DIM, PAIRS)
    else:
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
    if UNROLL_STEPS > 0:  # K's full steps unrolled: no step's loads wait for the sums before it
        for s in tl.static_range(1, UNROLL_STEPS):
            acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, s * BLOCK_K, xk,
                                           K, M, False)
    else:
        for k0 in tl.range(BLOCK_K, k_full, BLOCK_K, num_stages=STAGES):
            acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, k0, xk, K, M,
                                           False)
    if (k_full < K) & (k_full > 0):  # K < BLOCK_K: the first step was the tail
        acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, w_ptrs, x_ptr, stride_xm, k_full, xk, K, M,
                                       True)
    if HAS_BIAS:
        b = tl.load(b_ptr + rows).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    _store_row(y_ptr, stride_ym, acc0, b, n, n_ok, 0, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr,
               slots_ptr, stride_slot, ROPE, CACHE, Q_HEADS, KV_HEADS, HEAD_DIM, PAIRS, LIBDEVICE)
    if M > 1:
        _store_row(y_ptr, stride_ym, acc1, b, n, n_ok, 1, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr,
                   slots_ptr, stride_slot, ROPE, CACHE, Q_HEADS, KV_HEADS, HEAD_DIM, PAIRS, LIBDEVICE)
    if M > 2:
        _store_row(y_ptr, stride_ym, acc2, b, n, n_ok, 2, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr,
                   slots_ptr, stride_slot, ROPE, CACHE, Q_HEADS, KV_HEADS, HEAD_DIM, PAIRS, LIBDEVICE)
    if M > 3:
        _store_row(y_ptr, stride_ym, acc3, b, n, n_ok, 3, pos_ptr, inv_freq_ptr, concentration, k_ptr, v_ptr,
                   slots_ptr, stride_slot, ROPE, CACHE, Q_HEADS, KV_HEADS, HEAD_DIM, PAIRS, LIBDEVICE)


@functools.cache
def _num_sms(index: int | None) -> int:
    if INTERPRET or not torch.cuda.is_available():
        return 132  # an H100 SXM: the interpreter only needs a plausible grid
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_config(M: int, N: int, K: int, sms: int = 132) -> dict:
    """Launch parameters for x [M, K] @ weight [N, K]^T: an untuned starting point (compiled offline
    for sm_90, not yet timed; scripts/bench_linear.py --sweep tries the alternatives).

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
    - UNROLL: K's steps unrolled (up to MAX_UNROLL of them), so that a program's loads are issued
      together rather than one step's after the sums of the step before; GPT_OSS_GEMV_UNROLL=0 keeps
      the loop (the bench's A/B switch). Measured in docs/performance.md, "Attention and dense GEMV
      constants".
    """
    block_n = 8
    while block_n > 2 and triton.cdiv(N, block_n) < 4 * sms:
        block_n //= 2
    block_k = 4096 // block_n
    while block_k > 128 and M * block_n * block_k > 8192:
        block_k //= 2
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))  # no wider than K (tiny shapes)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": 1, "num_warps": 4,
            "UNROLL": options.gemv_unroll}


def fits(x: torch.Tensor, weight: torch.Tensor, rope: Rope | None = None) -> bool:
    """Whether linear_gemv takes x [M, K] and weight [N, K]: 1 <= M <= FEW_ROWS, unit stride along K,
    a contiguous weight of x's dtype, both on one CUDA device (or CPU tensors under the interpreter);
    with `rope`, also a power-of-two head_dim (the epilogue's tiles), N = (Hq + 2 Hkv) * head_dim,
    one position per row and fp32 inv_freq [head_dim / 2], on x's device."""
    if x.dim() != 2 or weight.dim() != 2 or not 1 <= x.shape[0] <= FEW_ROWS or x.shape[1] != weight.shape[1]:
        return False
    if x.shape[1] == 0 or weight.shape[0] == 0 or x.stride(1) != 1 or not weight.is_contiguous():
        return False
    if x.dtype != weight.dtype or x.dtype not in _DTYPES or x.device != weight.device:
        return False
    if rope is not None and not _rope_fits(x, weight, rope):
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


def _rope_fits(x: torch.Tensor, weight: torch.Tensor, rope: Rope) -> bool:
    d, positions, inv_freq = rope.head_dim, rope.positions, rope.inv_freq
    if d < 2 or d & (d - 1) or weight.shape[0] != (rope.num_q_heads + 2 * rope.num_kv_heads) * d:
        return False
    if positions.shape != (x.shape[0],) or positions.dtype.is_floating_point or positions.device != x.device:
        return False
    return inv_freq.shape == (d // 2,) and inv_freq.dtype == torch.float32 and inv_freq.device == x.device


def _check_cache(cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor, rope: Rope) -> None:
    """KV pages [num_pages, page_size, Hkv, D] (contiguous; x's dtype or float8 e4m3) and one flat slot
    per row of x."""
    k_pages, v_pages, slots = cache
    assert k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.shape == v_pages.shape
    assert k_pages.shape[2:] == (rope.num_kv_heads, rope.head_dim), k_pages.shape
    assert k_pages.dtype == v_pages.dtype and k_pages.dtype in (x.dtype, torch.float8_e4m3fn), k_pages.dtype
    assert k_pages.device == v_pages.device == x.device
    assert slots.shape == (x.shape[0],) and not slots.dtype.is_floating_point and slots.device == x.device


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, rope: Rope | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                **config) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N] -> [M, N] in x.dtype (fp32 sums, rounded once).

    `out` ([M, N], x.dtype, unit stride along N) receives the result if given. `config` overrides
    any of gemv_config's BLOCK_N, BLOCK_K, STAGES, num_warps, UNROLL (the bench's sweep).

    `rope`: the result is a QKV projection's output as rope_qk_triton would leave it (q and k heads
    rotated by row m's position rope.positions[m]; v as it was), computed from the fp32 sums with one
    rounding; `cache` = (k_pages, v_pages, slots) also stores row m's k (rotated) and v at flat row
    slots[m] of the pages, as rope_qk_triton does. With rope, BLOCK_N must be at least 2.
    """
    assert fits(x, weight, rope), "linear_gemv: see fits()"
    assert cache is None or rope is not None, "linear_gemv: a cache is filled only with rope"
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None:
        assert bias.shape == (N,) and bias.dtype == x.dtype and bias.is_contiguous() \
            and bias.device == x.device
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    assert out.shape == (M, N) and out.dtype == x.dtype and out.stride(1) == 1 and out.device == x.device
    cfg = gemv_config(M, N, K, _num_sms(x.device.index if x.is_cuda else None))
    if rope is not None and not INTERPRET:
        cfg.update(ROPE_CONFIG)
    if INTERPRET:  # the interpreter runs programs one by one at a cost each: few, wide ones (CPU tests)
        cfg.update(BLOCK_N=min(64, triton.next_power_of_2(N)),
                   BLOCK_K=min(256, max(16, triton.next_power_of_2(K))))
    cfg.update(config)
    block_n = cfg.pop("BLOCK_N")
    block_k = cfg.pop("BLOCK_K")
    steps = K // block_k  # full steps
    cfg["UNROLL_STEPS"] = steps if cfg.pop("UNROLL") and steps <= MAX_UNROLL else 0
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, out, N, K, x.stride(0), out.stride(0),
        *_rope_args(x, rope, cache), M=M, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        VEC=min(16 // x.element_size(), block_k), **_rope_constants(rope, cache, block_n), **cfg,
        **pdl.launch_args(x.device))
    return out


def _rope_args(x: torch.Tensor, rope: Rope | None, cache) -> tuple:
    """The kernel's positions, inv_freq, concentration, k and v pages, slots and page row stride
    (stand-ins, never read, where absent)."""
    if rope is None:
        return x, x, 1.0, x, x, x, 0
    if cache is None:
        cache = (x, x, rope.positions)
    else:
        _check_cache(cache, x, rope)
    k_pages, v_pages, slots = cache
    return (rope.positions.contiguous(), rope.inv_freq.contiguous(), float(rope.concentration), k_pages,
            v_pages, slots.contiguous(), rope.num_kv_heads * rope.head_dim)


def _rope_constants(rope: Rope | None, cache, block_n: int) -> dict:
    """The kernel's RoPE constexprs. A program owns PAIRS rotation pairs of each of its heads: half its
    rows while BLOCK_N <= head_dim (BLOCK_N stays the GEMV's, so the grid keeps its size), whole
    heads beyond."""
    if rope is None:
        return {"ROPE": False, "CACHE": False, "Q_HEADS": 0, "KV_HEADS": 0, "HEAD_DIM": 2, "PAIRS": 1,
                "LIBDEVICE": False}
    assert block_n >= 2, "linear_gemv: RoPE needs BLOCK_N >= 2 (a program owns whole pairs)"
    return {"ROPE": True, "CACHE": cache is not None, "Q_HEADS": rope.num_q_heads,
            "KV_HEADS": rope.num_kv_heads, "HEAD_DIM": rope.head_dim,
            "PAIRS": min(block_n, rope.head_dim) // 2, "LIBDEVICE": not INTERPRET}
