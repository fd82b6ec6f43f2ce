"""RoPE with YaRN on q and k in place (rope_triton), with k and v stored to the cache, against its
torch reference (rope), and the reference against the spec's numbers.

CPU: Triton's interpreter in fp32, so kernel and reference differ only in libm: tolerances ~1e-5
relative. GPU only: bf16 at the real shapes, with bf16 tolerances. Inputs are fresh random numbers
each run; the seed is printed, so a failure's output shows it.
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from kernel_inputs import BF16_U, DEVICE, gpt_oss_yarn, randn  # noqa: E402
from runtime.kernels.rope import apply_rope, cos_sin, rope_qk, yarn_frequencies  # noqa: E402
from runtime.kernels.rope_triton import rope_qk_triton  # noqa: E402


def random_positions(n, gen):
    """Positions over the whole 131072-token context, its two ends included."""
    pos = torch.randint(0, 131072, (n,), generator=gen, device=DEVICE)
    pos[0] = 131071
    pos[n // 2] = 0
    return pos


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
    inv_freq, c = gpt_oss_yarn(head_dim)
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
    inv_freq, c = gpt_oss_yarn(head_dim)
    pages = 2 * (rows // 16 + 1)
    k_pages = torch.full((pages, 16, kv_heads, head_dim), float("nan"), device=DEVICE)
    v_pages = torch.full_like(k_pages, float("nan"))
    slots = torch.randperm(pages * 16, generator=gen, device=DEVICE)[:rows]
    want = rope_qk_triton(qkv.clone(), positions, inv_freq, c, heads, kv_heads, head_dim)
    q, k, v = rope_qk_triton(qkv, positions, inv_freq, c, heads, kv_heads, head_dim,
                             cache=(k_pages, v_pages, slots))
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
    inv_freq, c = gpt_oss_yarn(32)
    q, k, v = rope_qk_triton(torch.empty(0, 24 * 32, device=DEVICE),
                             torch.empty(0, dtype=torch.int64, device=DEVICE), inv_freq, c, 16, 4, 32)
    assert q.shape == (0, 16, 32) and k.shape == v.shape == (0, 4, 32)


# --- bf16 at the real shapes (GPU) --------------------------------------------------------------


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


def test_yarn_frequencies_match_the_spec():
    inv_freq, c = yarn_frequencies(64, 150000.0, 32.0, 4096, 1.0, 32.0)
    expected = [1.0, 0.68904, 0.47478, 0.32715, 0.22542, 0.15532, 0.10702, 0.073745, 0.050813, 0.031706,
                0.019335, 0.011592, 0.0067950, 0.0038604, 0.0020938, 0.0010526, 4.5648e-4, 1.2932e-4,
                3.8309e-5]
    assert inv_freq[: len(expected)].tolist() == pytest.approx(expected, rel=1e-4)
    assert inv_freq[-1].item() == pytest.approx(3.0235e-7, rel=1e-3)
    assert c == 1.3465735902799727


def test_rope_rotates_half_split_pairs():
    x = torch.randn(3, 2, 8)
    inv_freq = torch.tensor([1.0, 0.5, 0.25, 0.125])
    cos, sin = cos_sin(torch.tensor([0, 1, 5]), inv_freq, 2.0, torch.float32)
    out = apply_rope(x, cos, sin)
    t, i = 2, 1  # position 5, pair (1, 5)
    angle = 5 * 0.5
    a, b = x[t, :, i], x[t, :, i + 4]
    assert torch.allclose(out[t, :, i], 2 * (a * math.cos(angle) - b * math.sin(angle)), atol=1e-5)
    assert torch.allclose(out[t, :, i + 4], 2 * (b * math.cos(angle) + a * math.sin(angle)), atol=1e-5)
    assert torch.allclose(out[0], 2 * x[0])  # position 0: no rotation, only the concentration


def test_yarn_frequencies_match_spec():
    inv_freq, concentration = yarn_frequencies(64, 150000.0, 32.0, 4096, 1.0, 32.0)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (32,)
    spec = [1.0, 0.68904, 0.47478, 0.32715, 0.22542, 0.15532, 0.10702, 0.073745, 0.050813, 0.031706,
            0.019335, 0.011592, 0.0067950, 0.0038604, 0.0020938, 0.0010526, 4.5648e-4, 1.2932e-4, 3.8309e-5]
    assert inv_freq[:len(spec)].tolist() == pytest.approx(spec, rel=1e-4, abs=1e-4)
    assert inv_freq[:len(spec)].tolist() == pytest.approx(spec, rel=2e-4)  # also the tiny ones
    assert inv_freq[-1].item() == pytest.approx(3.0235e-7, rel=2e-4)
    assert concentration == pytest.approx(1.3465735902799727, rel=1e-15)
    # Dims 18.. are the original frequency / 32; dims 0..8 the original one.
    original = 150000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(inv_freq[18:].double(), original[18:] / 32, rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[:9].double(), original[:9], rtol=1e-6, atol=0)


def test_rope_is_half_split_and_scaled_by_the_concentration():
    inv_freq = torch.tensor([0.5, 0.25])
    c = 1.5
    cos, sin = cos_sin(torch.tensor([3]), inv_freq, c, torch.float32)
    a0, a1 = 3 * 0.5, 3 * 0.25
    torch.testing.assert_close(cos[0], torch.tensor([math.cos(a0) * c, math.cos(a1) * c]))
    torch.testing.assert_close(sin[0], torch.tensor([math.sin(a0) * c, math.sin(a1) * c]))
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # components (0, 2) and (1, 3) rotate together
    out = apply_rope(x, cos, sin)[0, 0].tolist()
    C0, S0, C1, S1 = math.cos(a0) * c, math.sin(a0) * c, math.cos(a1) * c, math.sin(a1) * c
    expected = [1 * C0 - 3 * S0, 2 * C1 - 4 * S1, 3 * C0 + 1 * S0, 4 * C1 + 2 * S1]
    assert out == pytest.approx(expected, rel=1e-6)
