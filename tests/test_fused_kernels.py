"""The fused Triton kernels (add + RMSNorm, in-place RoPE on q/k) against their torch references.

CPU: Triton's interpreter, fp32 (its bf16 math is wrong, environment.md), so kernel and reference
differ only in summation order and libm: tolerances ~1e-5 relative. Without a GPU those tests run on
CPU tensors; with one, on CUDA tensors. GPU only: bf16 at the real shapes, with bf16 tolerances.
Inputs are fresh random numbers each run; the seed is printed, so a failure's output shows it.
"""

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.config import preset  # noqa: E402
from runtime.kernels.fused_triton import add_rms_norm_triton, rope_qk_triton  # noqa: E402
from runtime.kernels.rmsnorm import add_rms_norm  # noqa: E402
from runtime.kernels.rope import rope_qk, yarn_frequencies  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = preset("gpt-oss-20b").rms_norm_eps
BF16_U = 2.0**-8  # bf16 unit roundoff: rounding to nearest moves a value by at most this fraction of it


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def yarn(head_dim):
    cfg = preset("gpt-oss-20b")
    inv_freq, c = yarn_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
                                   cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    return inv_freq.to(DEVICE), c


def random_positions(n, gen):
    """Positions over the whole 131072-token context, its two ends included."""
    pos = torch.randint(0, 131072, (n,), generator=gen, device=DEVICE)
    pos[0] = 131071
    pos[n // 2] = 0
    return pos


# --- add + RMSNorm, fp32 ------------------------------------------------------------------------

@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("width", [2880, 128])  # gpt-oss hidden (not a power of two) and tiny's
def test_add_rms_norm_matches_the_reference(gen, width, rows, with_delta):
    x = randn(rows, width, gen=gen, scale=3.0)
    delta = randn(rows, width, gen=gen) if with_delta else None
    gain = randn(width, gen=gen)
    x_before = x.clone()
    residual_out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    normed_out = torch.full_like(x, float("nan"))
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS, residual_out=residual_out, normed_out=normed_out)
    want_residual, want_normed = add_rms_norm(x, delta, gain, EPS)
    assert normed is normed_out
    if with_delta:
        assert residual is residual_out
        assert torch.equal(residual, want_residual)  # the same fp32 add
    else:
        assert residual is x  # no copy
    assert torch.equal(x, x_before)
    # fp32: only the order of the sum of squares differs (measured <= 4e-7 relative).
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_allocates_outputs_for_any_leading_shape(gen):
    x, delta, gain = randn(3, 5, 128, gen=gen), randn(3, 5, 128, gen=gen), randn(128, gen=gen)
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS)
    want_residual, want_normed = add_rms_norm(x, delta, gain, EPS)
    assert residual.shape == normed.shape == x.shape
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_in_place_residual(gen):
    x, delta, gain = randn(7, 2880, gen=gen), randn(7, 2880, gen=gen), randn(2880, gen=gen)
    want_residual, want_normed = add_rms_norm(x, delta, gain, EPS)
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS, residual_out=x)
    assert residual is x and torch.equal(x, want_residual)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_many_narrow_rows(gen):
    # More rows than a CUDA grid's y/z limit (65535): rows go on the x axis, offsets in int64.
    rows, width = 65537, 16
    x, delta, gain = randn(rows, width, gen=gen), randn(rows, width, gen=gen), randn(width, gen=gen)
    normed_out = torch.full_like(x, float("nan"))
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS, normed_out=normed_out)
    want_residual, want_normed = add_rms_norm(x, delta, gain, EPS)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(normed, want_normed, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_rejects_rows_wider_than_its_registers():
    x = torch.ones(1, 8193, device=DEVICE)
    with pytest.raises(ValueError, match="8193"):
        add_rms_norm_triton(x, None, torch.ones(8193, device=DEVICE), EPS)


# --- RoPE on q and k, fp32 ----------------------------------------------------------------------

def run_rope(gen, n, heads, kv_heads, head_dim, dtype, pos_dtype=torch.int64):
    """Kernel and reference on the same random qkv; qkv is a column slice of a wider buffer (row
    stride > width), so a write outside it would show in the buffer."""
    width = (heads + 2 * kv_heads) * head_dim
    lo, hi = 5, 5 + width
    buf = randn(n, width + 8, gen=gen, dtype=dtype)
    before = buf.clone()
    qkv = buf[:, lo:hi]
    positions = random_positions(n, gen).to(pos_dtype)
    inv_freq, c = yarn(head_dim)
    want = rope_qk(qkv.clone(), positions, inv_freq, c, heads, kv_heads, head_dim)
    got = rope_qk_triton(qkv, positions, inv_freq, c, heads, kv_heads, head_dim)
    return SimpleNamespace(got=got, want=want, buf=buf, before=before, lo=lo, hi=hi, positions=positions,
                           inv_freq=inv_freq, c=c)


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 4, 32), (64, 8, 64)])  # tiny, gpt-oss
def test_rope_qk_matches_the_reference_in_place(gen, heads, kv_heads, head_dim, rows):
    r = run_rope(gen, rows, heads, kv_heads, head_dim, torch.float32)
    (q, k, v), (want_q, want_k, want_v) = r.got, r.want
    assert q.shape == (rows, heads, head_dim) and k.shape == v.shape == (rows, kv_heads, head_dim)
    # Views of qkv, in order: the rotation happened in place.
    base, item = r.buf[:, r.lo:].data_ptr(), r.buf.element_size()
    assert (q.data_ptr(), k.data_ptr(), v.data_ptr()) == (base, base + heads * head_dim * item,
                                                          base + (heads + kv_heads) * head_dim * item)
    # fp32: cos/sin from numpy (interpreter) or libdevice (GPU) against torch's, a few fp32 ulps of
    # angles up to 131071 rad (measured <= 1e-6 absolute on O(1) outputs).
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, want_v)
    v_lo = r.hi - kv_heads * head_dim
    assert torch.equal(r.buf[:, v_lo:], r.before[:, v_lo:])  # v and the columns after qkv
    assert torch.equal(r.buf[:, :r.lo], r.before[:, :r.lo])  # the columns before it


@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(16, 4, 32), (64, 8, 64), (12, 2, 32)])
def test_rope_qk_writes_k_and_v_into_the_cache(gen, heads, kv_heads, head_dim, rows):
    """With a cache, every token's rotated k and its v land at its slot, and nothing else changes."""
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, gen=gen)
    positions = random_positions(rows, gen)
    inv_freq, c = yarn(head_dim)
    pages = 2 * (rows // 16 + 1)
    k_pages = torch.full((pages, 16, kv_heads, head_dim), float("nan"), device=DEVICE)
    v_pages = torch.full_like(k_pages, float("nan"))
    slots = torch.randperm(pages * 16, generator=gen, device=DEVICE)[:rows]
    want = rope_qk_triton(qkv.clone(), positions, inv_freq, c, heads, kv_heads, head_dim)
    q, k, v = rope_qk_triton(qkv, positions, inv_freq, c, heads, kv_heads, head_dim, cache=(k_pages, v_pages, slots))
    for got, ref in zip((q, k, v), want):
        assert torch.equal(got, ref)
    for stored, value in ((k_pages, k), (v_pages, v)):
        flat = stored.flatten(0, 1)
        assert torch.equal(flat[slots], value)
        untouched = torch.ones(pages * 16, dtype=torch.bool, device=DEVICE)
        untouched[slots] = False
        assert flat[untouched].isnan().all()


def test_rope_qk_takes_int32_positions(gen):
    r = run_rope(gen, 7, 16, 4, 32, torch.float32, pos_dtype=torch.int32)
    torch.testing.assert_close(r.got[0], r.want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.got[1], r.want[1], rtol=1e-5, atol=1e-5)


def test_rope_qk_empty_batch():
    inv_freq, c = yarn(32)
    q, k, v = rope_qk_triton(torch.empty(0, 24 * 32, device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE),
                             inv_freq, c, 16, 4, 32)
    assert q.shape == (0, 16, 32) and k.shape == v.shape == (0, 4, 32)


# --- bf16 at the real shapes (GPU) --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("delta_dtype", [torch.bfloat16, torch.float32])  # attention's out, the MoE's fp32 sum
@pytest.mark.parametrize("rows", [1, 4096, 65537])
def test_add_rms_norm_bf16_on_gpu(gen, rows, delta_dtype):
    width = preset("gpt-oss-20b").hidden_size
    x = randn(rows, width, gen=gen, dtype=torch.bfloat16, scale=3.0)
    delta = randn(rows, width, gen=gen, dtype=delta_dtype)
    gain = randn(width, gen=gen)
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS, residual_out=torch.full_like(x, float("nan")),
                                           normed_out=torch.full_like(x, float("nan")))
    want_residual, want_normed = add_rms_norm(x, delta, gain, EPS)
    assert torch.equal(residual, want_residual)  # one fp32 add, one round-to-nearest, in both
    # Both round (nearly) the same fp32 value once: equal, or one bf16 ulp (<= 2u relative) apart
    # where the fp32 values straddle a rounding boundary; that must be rare.
    diff = (normed.float() - want_normed.float()).abs()
    assert (diff <= 2 * BF16_U * want_normed.float().abs()).all(), diff.max()
    assert (normed != want_normed).float().mean() < 0.01
    # And against exact math on the rounded residual: one rounding, at most u relative (+ fp32 noise).
    r = residual.double()
    exact = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + EPS) * gain.double()
    assert ((normed.double() - exact).abs() <= (BF16_U + 1e-5) * exact.abs()).all()


@pytest.mark.gpu
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(64, 8, 64), (16, 4, 32)])
def test_rope_qk_bf16_on_gpu(gen, heads, kv_heads, head_dim):
    rows = 4096
    r = run_rope(gen, rows, heads, kv_heads, head_dim, torch.bfloat16)
    (q, k, v), (want_q, want_k, want_v) = r.got, r.want
    rotated = heads + kv_heads
    # The inputs, from the untouched copy: a = first half, b = second half of each head.
    a, b = r.before[:, r.lo:r.hi].unflatten(-1, (-1, head_dim))[:, :rotated].double().chunk(2, dim=-1)
    scale = r.c * torch.cat([a.abs() + b.abs()] * 2, dim=-1)  # c (|a| + |b|) bounds each output
    got = torch.cat([q, k], dim=1).double()
    ref = torch.cat([want_q, want_k], dim=1).double()
    # The reference rounds cos, sin, both products and the result to bf16 (<= 3u * scale), the kernel
    # only the result (<= u * scale): they differ by at most 4u * scale, to first order in u.
    assert ((got - ref).abs() <= 4.1 * BF16_U * scale).all(), ((got - ref).abs() / scale).max()
    # Exact math (fp64 cos/sin of the same fp32 angles): the kernel rounds once (<= u relative),
    # plus fp32 noise (libdevice cos/sin within 2 ulps, fused multiply-adds).
    angle = (r.positions.float()[:, None] * r.inv_freq[None, :]).double()[:, None, :]
    cos, sin = angle.cos() * r.c, angle.sin() * r.c
    exact = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    assert ((got - exact).abs() <= BF16_U * exact.abs() + 1e-5 * scale).all()
    assert torch.equal(v, want_v)
    v_lo = r.hi - kv_heads * head_dim
    assert torch.equal(r.buf[:, v_lo:], r.before[:, v_lo:])
    assert torch.equal(r.buf[:, :r.lo], r.before[:, :r.lo])
