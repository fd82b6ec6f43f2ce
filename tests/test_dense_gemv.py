"""The few-row GEMV kernel (linear_gemv) against torch.nn.functional.linear.

CPU: Triton's interpreter in fp32 at tiny shapes that leave a partial K block and a partial row
block, equal to torch's linear to 1e-5. GPU: bf16 at the attention projections' shapes (gpt-oss,
tp=1 and tp=2) against the fp32 linear of the same bf16 numbers. Inputs are fresh random numbers
each run (never zeros); the seed is printed.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.kernels.dense_gemv import FEW_ROWS, fits, gemv_config, linear_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    assert not fits(torch.zeros(2, 16, device=DEVICE), torch.zeros(16, 8, device=DEVICE).t())  # weight not contiguous
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
