"""RoPE (YaRN) on the q and k heads of the QKV projection's output in Triton, in place, with cos/sin
computed in registers from the positions, optionally storing k and v into the paged KV cache in the
same launch. Unfused, torch builds cos/sin tables, splits, chunks and concatenates, writing new q
and k tensors.

A memory-bound elementwise kernel: it exists to touch each byte once. Its reference is
`rope.rope_qk`; tests/test_rope.py checks one against the other (CPU: Triton's interpreter in fp32;
GPU: bf16 at the real shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from runtime.kernels import pdl
from runtime.kernels.kv_store_triton import to_cache
from runtime.kernels.step_kernel import step_kernel
from runtime.options import options

# The interpreter (CPU) runs tl.cos/tl.sin as numpy; it has no libdevice (calls return None there).
INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined
_TILE = 4096  # elements per program: 8 KB of bf16 per tensor, enough in flight to stream at HBM speed


@triton.jit
def rope_cos_sin(pos, inv_freq, concentration, LIBDEVICE: tl.constexpr):
    """c * cos and c * sin of the angles pos * inv_freq (fp32, broadcast shapes), as rope.cos_sin
    computes them before its rounding; shared by every kernel that rotates, so all agree bit for bit."""
    angle = pos * inv_freq  # one fp32 product, as in rope.cos_sin
    if LIBDEVICE:
        # __nv_cosf/__nv_sinf reduce the argument exactly; angles reach 131071 rad at the longest context.
        cos, sin = libdevice.cos(angle), libdevice.sin(angle)
    else:
        cos, sin = tl.cos(angle), tl.sin(angle)
    return cos * concentration, sin * concentration


@triton.jit
def rope_rotate(first, second, cos, sin):
    """The half-split pair (first, second) = (x_i, x_{i + D/2}) rotated, in fp32: rounding each output
    once is the caller's (the reference rounds cos/sin and every product to the activation dtype)."""
    return first * cos - second * sin, second * cos + first * sin


@step_kernel("N")
def _rope_qk_kernel(
    qkv_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, N, stride_t, stride_slot,
    concentration, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    HALF_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, LIBDEVICE: tl.constexpr,
    CACHE: tl.constexpr, PDL: tl.constexpr,
):
    # A [BLOCK_T tokens, BLOCK_H heads, HALF] tile of each row's heads (q, then k, then v, adjacent in
    # the QKV output): q and k heads are rotated in place; with CACHE, k (rotated) and v heads are
    # also stored at their token's slot of the KV cache. cos/sin are per (token, frequency).
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF_BLOCK)
    t_ok = tokens < N
    pdl.wait_for_previous_kernel(PDL)
    pos = tl.load(pos_ptr + tokens, mask=t_ok, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq[None, :], concentration, LIBDEVICE)
    rotated = (heads < Q_HEADS + KV_HEADS)[None, :, None]  # v heads pass through unrotated
    cos = tl.where(rotated, cos[:, None, :], 1.0)
    sin = tl.where(rotated, sin[:, None, :], 0.0)
    offs = tokens[:, None, None] * stride_t + heads[None, :, None] * (2 * HALF) + i[None, None, :]
    mask = t_ok[:, None, None] & (heads < Q_HEADS + 2 * KV_HEADS)[None, :, None] & (i < HALF)[None, None, :]
    first = tl.load(qkv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(qkv_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    # Half-split pairs (i, i + D/2); fp32 math and one rounding per output.
    out_first, out_second = rope_rotate(first, second, cos, sin)
    out_first = out_first.to(qkv_ptr.dtype.element_ty)
    out_second = out_second.to(qkv_ptr.dtype.element_ty)
    tl.store(qkv_ptr + offs, out_first, mask=mask & rotated)
    tl.store(qkv_ptr + offs + HALF, out_second, mask=mask & rotated)
    if CACHE:  # cache rows [slots, KV_HEADS, 2 * HALF]: k heads to k_cache, v heads to v_cache
        slot = tl.load(slots_ptr + tokens, mask=t_ok, other=0).to(tl.int64)
        is_k = (heads >= Q_HEADS) & (heads < Q_HEADS + KV_HEADS)
        is_v = heads >= Q_HEADS + KV_HEADS
        kv_head = tl.where(is_k, heads - Q_HEADS, heads - Q_HEADS - KV_HEADS)
        at = slot[:, None, None] * stride_slot + kv_head[None, :, None] * (2 * HALF) + i[None, None, :]
        k_mask = mask & is_k[None, :, None]
        v_mask = mask & is_v[None, :, None]
        tl.store(k_cache_ptr + at, to_cache(out_first, k_cache_ptr), mask=k_mask)
        tl.store(k_cache_ptr + at + HALF, to_cache(out_second, k_cache_ptr), mask=k_mask)
        tl.store(v_cache_ptr + at, to_cache(out_first, v_cache_ptr), mask=v_mask)
        tl.store(v_cache_ptr + at + HALF, to_cache(out_second, v_cache_ptr), mask=v_mask)


def rope_qk_triton(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, concentration: float,
                   num_q_heads: int, num_kv_heads: int, head_dim: int,
                   cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton version of rope.rope_qk, in place: rotates the q and k heads inside qkv and returns
    views q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D] of it.

    qkv [N, (Hq + 2 Hkv) * D] with unit column stride (any row stride); positions [N] (integers,
    converted to fp32 as rope.cos_sin does); inv_freq [D / 2] fp32. The views are strided (row
    stride = qkv's), not contiguous like the reference's q and k.

    cache = (k_pages, v_pages, slots): also store each token's rotated k and its v at flat row
    slots[n] of the pages ([num_pages, page_size, Hkv, D], contiguous; the model's dtype or float8
    e4m3, rounded as kv_cache.to_cache_dtype does), in the same launch.

    cos/sin and the rotation stay in fp32 and each output is rounded once, while the reference
    rounds cos, sin, both products and the result to the activation dtype: in bf16 the two differ
    by at most 4u * c * (|a| + |b|) for a pair (a, b), u = 2^-8 (tests/test_rope.py).
    """
    N, width = qkv.shape
    heads = num_q_heads + 2 * num_kv_heads
    assert width == heads * head_dim and head_dim % 2 == 0, (qkv.shape, num_q_heads, num_kv_heads, head_dim)
    assert qkv.stride(1) == 1 and positions.shape == (N,), (qkv.stride(), positions.shape)
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32, \
        (inv_freq.shape, inv_freq.dtype)
    if cache is not None:
        k_pages, v_pages, slots = cache
        assert k_pages.is_contiguous() and v_pages.is_contiguous() and k_pages.shape == v_pages.shape
        assert k_pages.shape[2:] == (num_kv_heads, head_dim) and slots.shape == (N,), \
            (k_pages.shape, slots.shape)
    half = head_dim // 2
    # Without a cache to fill, the v heads need no visit: the grid covers q and k only.
    visited = heads if cache is not None else num_q_heads + num_kv_heads
    if N:
        half_block = triton.next_power_of_2(half)
        # 8 heads a program (gpt-oss: 64 + 8 + 8 heads, ten exact groups), and tokens up to _TILE
        # elements (8 tokens at head_dim 64); decode's few tokens take smaller tiles.
        block_h = min(8, triton.next_power_of_2(visited))
        block_t = min(triton.next_power_of_2(N), max(1, _TILE // (block_h * 2 * half_block)))
        grid = (triton.cdiv(N, block_t), triton.cdiv(visited, block_h))
        k_pages, v_pages, slots = cache if cache is not None \
            else (qkv, qkv, positions)  # unused without CACHE
        _rope_qk_kernel[grid](
            qkv, positions.contiguous(), inv_freq.contiguous(), k_pages, v_pages, slots.contiguous(), N,
            qkv.stride(0), num_kv_heads * head_dim, float(concentration),
            Q_HEADS=num_q_heads, KV_HEADS=num_kv_heads, HALF=half, HALF_BLOCK=half_block, BLOCK_T=block_t,
            BLOCK_H=block_h, LIBDEVICE=not INTERPRET, CACHE=cache is not None, num_warps=4,
            **pdl.launch_args(qkv.device),
        )
    q, k, v = qkv.unflatten(-1, (-1, head_dim)).split([num_q_heads, num_kv_heads, num_kv_heads], dim=1)
    return q, k, v
