"""The residual add + RMSNorm kernel (rmsnorm_triton) against its torch reference (rmsnorm), and the
reference against the formula worked by hand.

CPU: Triton's interpreter in fp32, so kernel and reference differ only in summation order:
tolerances ~1e-5 relative. GPU only: bf16 at the real shapes, with bf16 tolerances. Inputs are fresh
random numbers each run; the seed is printed, so a failure's output shows it.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from kernel_inputs import BF16_U, DEVICE, randn  # noqa: E402
from runtime.config import preset  # noqa: E402
from runtime.kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: E402
from runtime.kernels.rmsnorm_triton import add_rms_norm_triton  # noqa: E402

EPS = preset("gpt-oss-20b").rms_norm_eps


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
    residual, normed = add_rms_norm_triton(x, delta, gain, EPS, residual_out=residual_out,
                                           normed_out=normed_out)
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


# --- bf16 at the real shapes (GPU) --------------------------------------------------------------

@pytest.mark.gpu
# attention's out, the MoE's fp32 sum
@pytest.mark.parametrize("delta_dtype", [torch.bfloat16, torch.float32])
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


def test_rms_norm():
    x, g = torch.randn(4, 16), torch.randn(16)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g
    assert torch.allclose(rms_norm(x, g, 1e-5), expected, atol=1e-6)


def test_rms_norm_by_hand():
    out = rms_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), 1e-5)
    r = 1 / math.sqrt((9 + 16) / 2 + 1e-5)
    assert out[0].tolist() == pytest.approx([3 * r, 8 * r], rel=1e-6)
    half = rms_norm(torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16), torch.tensor([1.0, 2.0]), 1e-5)
    assert half.dtype == torch.bfloat16
    assert half.float()[0].tolist() == pytest.approx([3 * r, 8 * r], rel=4e-3)  # one bf16 rounding
