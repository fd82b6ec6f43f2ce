"""The few-row GEMV kernel (linear_gemv) against torch.nn.functional.linear.

CPU: Triton's interpreter in fp32 at tiny shapes that leave a partial K block and a partial row
block, equal to torch's linear to 1e-5. GPU: bf16 at the attention projections' shapes (gpt-oss,
tp=1 and tp=2) against the fp32 linear of the same bf16 numbers. Inputs are fresh random numbers
each run (never zeros); the seed is printed.

With `rope=` (RoPE and the KV-cache store in the epilogue), against linear_gemv followed by
rope_triton.rope_qk_triton (the two launches it replaces) and against the torch reference (linear,
then rope.rope_qk), outputs and cache pages poisoned with NaN first: fp32 on CPU, bf16 on CPU
(the interpreter truncates where it should round: bounds use twice the unit roundoff) and on the
GPU at gpt-oss's QKV shape.
"""

import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from kernel_inputs import gpt_oss_yarn  # noqa: E402
from runtime.kernels.linear_triton import FEW_ROWS, Rope, fits, gemv_config, linear_gemv  # noqa: E402
from runtime.kernels.rope import rope_qk  # noqa: E402
from runtime.kernels.rope_triton import rope_qk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BF16_U = 2.0**-8  # bf16 unit roundoff (round to nearest)
KERNEL_BF16_U = 2 * BF16_U if INTERPRET else BF16_U  # the interpreter's fp32 -> bf16 cast truncates


def problem(gen, m, n, k, dtype, bias=True):
    """x [m, k] as a slice of a wider buffer (row stride > k), weight [n, k] / sqrt(k), bias [n]."""
    x = torch.randn(m, k + 3, generator=gen, device=DEVICE).to(dtype)[:, :k]
    weight = (torch.randn(n, k, generator=gen, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, weight, b


# (n, k, overrides): partial K blocks after several whole ones, N not a multiple of BLOCK_N, a K
# narrower than one block, and the default heuristic with its 512-wide K blocks plus a tail.
SHAPES = [(13, 100, {"BLOCK_N": 4, "BLOCK_K": 32}), (7, 37, {"BLOCK_N": 2, "BLOCK_K": 16}),
          (16, 24, {}), (10, 1100, {})]


@pytest.mark.parametrize("m", range(1, FEW_ROWS + 1))
@pytest.mark.parametrize("n, k, overrides", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gemv_matches_linear_fp32(gen, m, n, k, overrides, bias):
    x, weight, b = problem(gen, m, n, k, torch.float32, bias)
    assert fits(x, weight)
    out = torch.full((m, n), float("nan"), device=DEVICE)  # every element must be written
    y = linear_gemv(x, weight, b, out=out, **overrides)
    assert y is out and y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n, k, overrides", SHAPES)
def test_unrolled_steps_equal_the_loop(gen, m, n, k, overrides):
    """The unrolled K steps do the loop's arithmetic in the loop's order: the same bits."""
    x, weight, b = problem(gen, m, n, k, torch.float32, True)
    looped = linear_gemv(x, weight, b, UNROLL=False, **overrides)
    unrolled = linear_gemv(x, weight, b, UNROLL=True, **overrides)
    assert torch.equal(looped, unrolled)
    torch.testing.assert_close(unrolled, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_linear_gemv_allocates_its_output(gen):
    x, weight, b = problem(gen, 3, 9, 50, torch.float32)
    y = linear_gemv(x, weight, b, BLOCK_K=16)
    assert y.shape == (3, 9) and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_fits_takes_only_few_unit_stride_rows():
    w = torch.zeros(8, 16, device=DEVICE)
    assert fits(torch.zeros(1, 16, device=DEVICE), w) and fits(torch.zeros(FEW_ROWS, 16, device=DEVICE), w)
    assert not fits(torch.zeros(FEW_ROWS + 1, 16, device=DEVICE), w)
    assert not fits(torch.zeros(0, 16, device=DEVICE), w)
    assert not fits(torch.zeros(2, 15, device=DEVICE), w)  # K differs
    assert not fits(torch.zeros(16, 2, device=DEVICE).t(), w)  # stride along K is not 1
    assert not fits(torch.zeros(2, 16, device=DEVICE),
                    torch.zeros(16, 8, device=DEVICE).t())  # weight not contiguous
    assert not fits(torch.zeros(2, 16, device=DEVICE, dtype=torch.float64), w.double())
    assert not fits(torch.zeros(2, 16, device=DEVICE), w.to(torch.bfloat16))
    assert not fits(torch.zeros(16, device=DEVICE), w)


def test_config_keeps_several_programs_per_sm():
    # the attention projections of gpt-oss (tp=1 and tp=2) on an H100's 132 SMs
    for n, k in [(5120, 2880), (2880, 4096), (2560, 2880), (2880, 2048)]:
        for m in range(1, FEW_ROWS + 1):
            cfg = gemv_config(m, n, k, 132)
            assert -(-n // cfg["BLOCK_N"]) >= 4 * 132
            assert cfg["BLOCK_K"] >= 256 and m * cfg["BLOCK_N"] * cfg["BLOCK_K"] <= 8192  # registers
    assert gemv_config(1, 16, 24)["BLOCK_K"] == 32  # no wider than K


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(5120, 2880), (2880, 4096), (2560, 2880), (2880, 2048)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_linear_gemv_bf16_real_shapes(gen, n, k, m):
    x, weight, b = problem(gen, m, n, k, torch.bfloat16, bias=m != 3)
    want = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    y = linear_gemv(x, weight, b, out=out)
    assert y.dtype == torch.bfloat16
    # One rounding of the fp32 sum to bf16 (at most 2^-8 relative), plus fp32 summation order over
    # k <= 4096 terms, far below 1e-3 of the largest output.
    err = (y.float() - want).abs()
    bound = want.abs() * 2.0**-8 + 1e-3 * want.abs().max()
    assert bool((err <= bound).all()), (err.max(), (err - bound).max())


@pytest.mark.gpu
def test_linear_gemv_fp32_on_gpu(gen):
    x, weight, b = problem(gen, 2, 2880, 4096, torch.float32)
    torch.testing.assert_close(linear_gemv(x, weight, b), torch.nn.functional.linear(x, weight, b),
                               rtol=1e-4, atol=1e-4)


# --- RoPE and the KV cache in the epilogue ---------------------------------------------------------

def rope_problem(gen, m, head_dim, q_heads, kv_heads, k, dtype):
    """A QKV projection of m rows with random positions (100000 and the context's ends among them),
    gpt-oss's YaRN frequencies, and m distinct random slots in a pool of 4 pages of 16 rows."""
    x, weight, bias = problem(gen, m, (q_heads + 2 * kv_heads) * head_dim, k, dtype)
    positions = torch.randint(0, 131072, (m,), generator=gen, device=DEVICE)
    positions[: min(m, 3)] = torch.tensor([100000, 131071, 0][: min(m, 3)], device=DEVICE)
    inv_freq, c = gpt_oss_yarn(head_dim)
    slots = torch.randperm(64, generator=gen, device=DEVICE)[:m]
    rope = Rope(positions, inv_freq, c, head_dim, q_heads, kv_heads)
    return SimpleNamespace(x=x, weight=weight, bias=bias, rope=rope, slots=slots, dtype=dtype)


def rope_args(rope):
    """A Rope as rope_qk_triton's and rope_qk's positional arguments (head_dim last there)."""
    return (rope.positions, rope.inv_freq, rope.concentration, rope.num_q_heads, rope.num_kv_heads,
            rope.head_dim)


def poisoned_pages(r):
    shape = (4, 16, r.rope.num_kv_heads, r.rope.head_dim)
    return (torch.full(shape, float("nan"), dtype=r.dtype, device=DEVICE),
            torch.full(shape, float("nan"), dtype=r.dtype, device=DEVICE))


def fused(r, cache=True, **config):
    """(qkv, k_pages, v_pages) from the one launch, every output poisoned first."""
    k_pages, v_pages = poisoned_pages(r)
    out = torch.full((r.x.shape[0], r.weight.shape[0]), float("nan"), dtype=r.dtype, device=DEVICE)
    qkv = linear_gemv(r.x, r.weight, r.bias, out=out, rope=r.rope,
                      cache=(k_pages, v_pages, r.slots) if cache else None, **config)
    assert qkv is out
    return qkv, k_pages, v_pages


def two_launches(r, cache=True, **config):
    """The same from linear_gemv (same config: the same fp32 sums) and rope_qk_triton."""
    k_pages, v_pages = poisoned_pages(r)
    qkv = linear_gemv(r.x, r.weight, r.bias, **config)
    rope_qk_triton(qkv, *rope_args(r.rope), cache=(k_pages, v_pages, r.slots) if cache else None)
    return qkv, k_pages, v_pages


def heads(r, qkv):
    """qkv [m, N] as q [m, Hq, D], k, v [m, Hkv, D]."""
    rope = r.rope
    head_counts = [rope.num_q_heads, rope.num_kv_heads, rope.num_kv_heads]
    return qkv.unflatten(-1, (-1, rope.head_dim)).split(head_counts, 1)


def assert_cache_holds(r, pages, rows):
    """The pages hold `rows` [m, Hkv, D] at the slots (bit for bit) and NaN everywhere else."""
    flat = pages.flatten(0, 1)
    assert torch.equal(flat[r.slots], rows)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[r.slots] = False
    assert flat[untouched].isnan().all()


def assert_same_with_nans(got, want):
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


# (m, head_dim, q heads, kv heads, K, config): a program's rows are whole heads (the interpreter's
# default BLOCK_N 64; 2 heads at 128; 4 of 5 heads, the last program half past the end) or pairs
# of partial heads (BLOCK_N 32 of 64: 2 programs a head; 4 and 2 of 16: 4 and 8 programs a head),
# K with and without a partial block, 1-3 rows.
ROPE_SHAPES = [(1, 16, 4, 2, 100, {}), (2, 64, 4, 2, 128, {"BLOCK_N": 32, "BLOCK_K": 64}),
               (1, 16, 3, 1, 72, {"BLOCK_N": 64, "BLOCK_K": 32}),
               (3, 16, 4, 2, 64, {"BLOCK_N": 4, "BLOCK_K": 16}),
               (1, 64, 4, 2, 96, {"BLOCK_N": 128, "BLOCK_K": 32}),
               (1, 16, 2, 1, 64, {"BLOCK_N": 2, "BLOCK_K": 16}),
               # whole rows in one masked step (batch 1 on GPUs)
               (1, 16, 4, 2, 100, {"BLOCK_N": 2, "BLOCK_K": 128})]


@pytest.mark.parametrize("m, head_dim, q_heads, kv_heads, k, config", ROPE_SHAPES)
def test_gemv_rope_fp32_equals_the_two_launches_and_the_reference(gen, m, head_dim, q_heads, kv_heads, k,
                                                                   config):
    r = rope_problem(gen, m, head_dim, q_heads, kv_heads, k, torch.float32)
    assert fits(r.x, r.weight, r.rope)
    qkv, k_pages, v_pages = fused(r, **config)
    # fp32: the GEMV's rounding is exact, so both paths rotate the same sums with the same helpers.
    # On the GPU, allow the compiler a different fused multiply-add choice per kernel.
    tol = {"rtol": 0, "atol": 0} if INTERPRET else {"rtol": 1e-6, "atol": 1e-6}
    want = two_launches(r, **config)
    for got, ref in zip((qkv, k_pages, v_pages), want):
        torch.testing.assert_close(got, ref, equal_nan=True, **tol)
    q, k_, v = heads(r, qkv)
    assert_cache_holds(r, k_pages, k_)
    assert_cache_holds(r, v_pages, v)
    # The torch reference: tests/test_rope.py's fp32 tolerance for RoPE.
    ref_q, ref_k, ref_v = rope_qk(torch.nn.functional.linear(r.x, r.weight, r.bias), *rope_args(r.rope))
    for got, ref in ((q, ref_q), (k_, ref_k), (v, ref_v)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_gemv_rope_without_a_cache(gen):
    r = rope_problem(gen, 2, 16, 4, 2, 80, torch.float32)
    qkv, k_pages, v_pages = fused(r, cache=False, BLOCK_N=16, BLOCK_K=32)
    want, _, _ = two_launches(r, cache=False, BLOCK_N=16, BLOCK_K=32)
    torch.testing.assert_close(qkv, want, rtol=0 if INTERPRET else 1e-6, atol=0 if INTERPRET else 1e-6)
    assert k_pages.isnan().all() and v_pages.isnan().all()


def check_bf16(r, qkv, k_pages, v_pages, two):
    """bf16 outputs of the fused launch against exact math, the two launches and the torch reference.

    For a pair (a, b) of fp32 sums, scale = c (|a| + |b|) bounds both rotated outputs. The fused
    launch rounds each output once (<= U * scale, U the kernel's unit roundoff); the two launches
    round a and b first (<= U * scale after rotating), then the output: they differ by <= 3U * scale.
    The torch reference rounds the sums, cos, sin, both products and the result (<= 4u * scale)."""
    _, k_, v = heads(r, qkv)
    assert_cache_holds(r, k_pages, k_)  # the cache holds exactly what qkv holds
    assert_cache_holds(r, v_pages, v)
    rope, u = r.rope, KERNEL_BF16_U
    sums = torch.nn.functional.linear(r.x.double(), r.weight.double(), r.bias.double())
    sums = sums.unflatten(-1, (-1, rope.head_dim))
    rotated = rope.num_q_heads + rope.num_kv_heads
    a, b = sums.chunk(2, dim=-1)
    scale = rope.concentration * torch.cat([a.abs() + b.abs()] * 2, dim=-1)
    scale[:, rotated:] = sums[:, rotated:].abs()  # v: the sum itself, rounded once
    angle = (rope.positions.float()[:, None] * rope.inv_freq[None, :]).double()[:, None, :]
    cos, sin = angle.cos() * rope.concentration, angle.sin() * rope.concentration
    exact = sums.clone()
    exact[:, :rotated] = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)[:, :rotated]
    got = qkv.double().unflatten(-1, (-1, rope.head_dim))
    slack = 1e-5  # fp32 sums in another order, libdevice cos/sin within 2 ulps
    assert ((got - exact).abs() <= u * exact.abs() + slack).all(), \
        ((got - exact).abs() - u * exact.abs()).max()
    two_qkv, _, two_v = two
    diff = (got - two_qkv.double().unflatten(-1, (-1, rope.head_dim))).abs()
    assert (diff <= 3 * u * scale + slack).all(), (diff - 3 * u * scale).max()
    assert torch.equal(v, heads(r, two_qkv)[2])  # one rounding of the same sums in both
    assert_same_with_nans(v_pages, two_v)
    ref = torch.cat(rope_qk(torch.nn.functional.linear(r.x, r.weight, r.bias), *rope_args(rope)),
                    dim=1).double()
    assert ((got - ref).abs() <= (4.1 * BF16_U + u) * scale + slack).all(), ((got - ref).abs() / scale).max()


@pytest.mark.parametrize("m, head_dim, q_heads, kv_heads, k, config", ROPE_SHAPES[:2])
def test_gemv_rope_bf16(gen, m, head_dim, q_heads, kv_heads, k, config):
    r = rope_problem(gen, m, head_dim, q_heads, kv_heads, k, torch.bfloat16)
    check_bf16(r, *fused(r, **config), two_launches(r, **config))


def test_fits_checks_the_rope_shapes():
    x, w = torch.zeros(1, 16, device=DEVICE), torch.zeros(8 * 16, 16, device=DEVICE)
    pos, inv_freq = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(8, device=DEVICE)
    assert fits(x, w, Rope(pos, inv_freq, 1.0, 16, 4, 2))
    assert not fits(x, w, Rope(pos, inv_freq, 1.0, 16, 4, 1))  # N is not (Hq + 2 Hkv) * D
    assert not fits(x, torch.zeros(8 * 12, 16, device=DEVICE),
                    Rope(pos, torch.zeros(6, device=DEVICE), 1.0, 12, 4, 2))
    assert not fits(x, w, Rope(pos.repeat(2), inv_freq, 1.0, 16, 4, 2))  # one position per row
    assert not fits(x, w, Rope(pos.float(), inv_freq, 1.0, 16, 4, 2))
    assert not fits(x, w, Rope(pos, inv_freq.double(), 1.0, 16, 4, 2))
    assert not fits(x, w, Rope(pos, inv_freq[:4], 1.0, 16, 4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"BLOCK_N": 64, "BLOCK_K": 64}])  # pairs (the default), whole heads
def test_gemv_rope_bf16_gpt_oss_qkv(gen, config):
    """gpt-oss's decode step: one row, QKV [5120, 2880], 64 q heads, 8 k and 8 v of 64."""
    r = rope_problem(gen, 1, 64, 64, 8, 2880, torch.bfloat16)
    assert fits(r.x, r.weight, r.rope)
    check_bf16(r, *fused(r, **config), two_launches(r, **config))
