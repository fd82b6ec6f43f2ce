"""The fused router kernel (gate projection, top-k, softmax over the chosen) against moe.route.

CPU: Triton's interpreter in fp32, where logits are distinct, so the experts must be the
reference's exactly and the weights equal to 1e-5. GPU: bf16 at the real shapes, where the
kernel's dot sums in another order than cuBLAS and bf16 logits can tie: the chosen experts' logits
must be the reference's top-k values to within a bf16 rounding, and the weights close.
Inputs are fresh random numbers each run; the seed is printed.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()

from runtime.kernels.moe import route  # noqa: E402
from runtime.kernels.moe_gemm import plan  # noqa: E402
from runtime.kernels.router_triton import route_and_plan, route_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gate(gen, tokens, experts, width, dtype):
    h = torch.randn(tokens, width, generator=gen, device=DEVICE).to(dtype)
    weight = (torch.randn(experts, width, generator=gen, device=DEVICE) / width**0.5).to(dtype)
    bias = (torch.randn(experts, generator=gen, device=DEVICE) * 0.1).to(dtype)
    return h, weight, bias


# up to 64 tokens the GEMV + top-k kernels, beyond the one fused tl.dot kernel
@pytest.mark.parametrize("tokens, experts, width, k", [(1, 32, 96, 4), (5, 4, 64, 2), (37, 128, 160, 4),
                                                       (17, 20, 300, 3), (70, 32, 96, 4), (130, 128, 64, 4)])
def test_route_triton_matches_the_reference_fp32(gen, tokens, experts, width, k):
    h, weight, bias = gate(gen, tokens, experts, width, torch.float32)
    want_ids, want_weights = route(torch.nn.functional.linear(h, weight, bias), k)
    for ids_dtype in (torch.int64, torch.int32):
        ids, weights = route_triton(h, weight, bias, k, ids_dtype)
        assert ids.dtype == ids_dtype and ids.shape == (tokens, k) and weights.shape == (tokens, k)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)


# up to 16 tokens the sort runs inside the top-k program; beyond, moe_gemm.plan
@pytest.mark.parametrize("tokens, experts, k", [(1, 32, 4), (7, 8, 4), (16, 128, 4), (16, 4, 3), (17, 32, 4)])
def test_route_and_plan_equals_route_then_plan(gen, tokens, experts, k):
    h, weight, bias = gate(gen, tokens, experts, 96, torch.float32)
    ids, weights, rows = route_and_plan(h, weight, bias, k)
    want_ids, want_weights = route_triton(h, weight, bias, k, torch.int32)
    want = plan(want_ids, experts)
    assert ids.dtype == torch.int32 and torch.equal(ids, want_ids) and torch.equal(weights, want_weights)
    for name in ("order", "position", "counts", "offsets"):
        assert torch.equal(getattr(rows, name), getattr(want, name)), name
    assert (rows.num_rows, rows.num_experts) == (tokens * k, experts)


@pytest.mark.parametrize("tokens", [2, 80])
def test_route_triton_breaks_ties_toward_the_lower_expert(tokens):
    h = torch.ones(tokens, 32, device=DEVICE)
    weight = torch.zeros(8, 32, device=DEVICE)
    bias = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0, -1.0], device=DEVICE)
    ids, weights = route_triton(h, weight, bias, 4)
    assert ids.tolist() == [[1, 3, 6, 2]] * tokens
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[1.0, 1.0, 1.0, 0.5]] * tokens, device=DEVICE), -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 at the real shapes needs a GPU")
@pytest.mark.parametrize("experts", [32, 128])  # gpt-oss-20b, gpt-oss-120b
@pytest.mark.parametrize("tokens", [1, 64, 300, 4096])
def test_route_triton_bf16_at_real_shapes(gen, experts, tokens):
    h, weight, bias = gate(gen, tokens, experts, 2880, torch.bfloat16)
    logits = torch.nn.functional.linear(h, weight, bias).float()
    ids, weights = route_triton(h, weight, bias, 4, torch.int32)
    want_values, _ = torch.topk(logits, 4, dim=-1)
    got_values = logits.gather(1, ids.long())
    assert (ids.long().sort(-1).values.diff(dim=-1) > 0).all()  # four distinct experts per token
    # Within two bf16 ulps of the logit scale: the kernel's logits round from another summation order.
    ulp = 2.0**-7 * want_values.abs().amax(-1, keepdim=True)
    assert ((got_values - want_values).abs() <= 2 * ulp).all()
    torch.testing.assert_close(weights, torch.softmax(got_values, -1), rtol=0, atol=2e-2)
